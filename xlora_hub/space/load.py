"""Loading a mixture for the demo: the model, its tokenizer and model card, with one-line errors.

A Space (or ``xlora-hub demo``) should fail at start, naming the mixture and the fix, not at the first
request with a traceback. How an error is worded comes from :func:`xlora_hub.error_messages.format_error`,
the formatter the CLI uses too; only what is about the mixture argument itself (no such repo, a bad
revision, a gated or unreachable repo) gets the Space's own hint, which names ``HF_TOKEN`` (a Space has no
``--token``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..error_messages import format_error
from ..errors import InvalidMixtureError
from ..hub import load_tokenizer
from .page import read_model_card

__all__ = ["DemoMixture", "load_demo", "load_error"]


@dataclass
class DemoMixture:
    """A mixture ready for the demo: the model, its tokenizer, and what the page says about it."""

    model: Any
    tokenizer: Any
    name: str
    revision: str | None = None
    card: str | None = None
    examples: list[str] = field(default_factory=list)


def _mixture_hint(mixture: str, err: BaseException) -> str | None:
    """The Space's fix for an error about the mixture argument itself, read from the error's type and its
    ``repo_id`` field; ``None`` when the error is about something else (an expert, the base model)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, RevisionNotFoundError):
        return f"the revision does not exist on {constants.ENDPOINT}; give a branch, tag or commit of the repo."
    if isinstance(err, GatedRepoError):
        return "the repo is gated; accept its conditions on the Hub and set HF_TOKEN."
    if isinstance(err, RepositoryNotFoundError) and getattr(err, "repo_id", None) == mixture:
        return (
            f"no such repo on {constants.ENDPOINT} (or it is private: set HF_TOKEN). Give a Hub repo id "
            "('owner/name') or a local mixture folder."
        )
    if isinstance(err, HFValidationError):
        return "it is neither a local mixture folder nor a valid Hub repo id ('owner/name')."
    if isinstance(err, LocalEntryNotFoundError):
        return f"the Hub ({constants.ENDPOINT}) cannot be reached and the mixture is not in the local cache."
    return None


def load_error(
    mixture: str, revision: str | None, err: BaseException, *, token: str | bool | None = None
) -> InvalidMixtureError | None:
    """``Cannot load the mixture ...: why`` for a user's error, or ``None`` for a bug (let it raise as is)."""
    why = _mixture_hint(mixture, err)
    if why is None:
        why = format_error(err, token=token if isinstance(token, str) else None)
    if why is None:
        return None
    where = f"{mixture!r}" + (f" at revision {revision!r}" if revision else "")
    return InvalidMixtureError(f"Cannot load the mixture {where}: {why}")


def _demo_card() -> tuple[str, list[str]]:
    """What the page says about the embedded default mixture, and one example prompt per expert."""
    import random

    from ..demo import TASKS, make_task_example

    rows = [make_task_example(task, random.Random(index)) for index, task in enumerate(TASKS)]
    table = "\n".join(f"| {r['expert']} | `{r['prompt']}` | `{r['completion']}` |" for r in rows)
    card = (
        "The embedded default mixture: a tiny Llama-style model with a character-level tokenizer, one LoRA "
        "expert per synthetic task and an X-LoRA classifier trained to route between them. It is built on "
        "your machine from a seed; nothing is downloaded. The base model reads every task format but solves "
        "none; compare its answers with the mixture's.\n\n"
        f"| expert | example prompt | answer |\n|---|---|---|\n{table}"
    )
    return card, [r["prompt"] for r in rows]


def _load_model(name: str, *, revision: str | None, token: str | bool | None) -> Any:
    """``XLoraModel.from_pretrained`` with every user error turned into one :class:`InvalidMixtureError`."""
    from ..model import XLoraModel

    try:
        return XLoraModel.from_pretrained(name, revision=revision, token=token)
    except Exception as err:
        worded = load_error(name, revision, err, token=token)
        if worded is None:
            raise
        raise worded from err


def load_demo(
    mixture: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> DemoMixture:
    """Load a mixture (Hub repo id or local folder; ``None``: the embedded default mixture) and its tokenizer.

    Every failure to find the mixture is an :class:`~xlora_hub.errors.InvalidMixtureError` whose one-line
    message names the mixture and the fix, so a Space or the CLI fails at start, not at the first request.
    """
    if mixture is None:
        from ..demo import load_demo_mixture

        model, tokenizer = load_demo_mixture()
        card, examples = _demo_card()
        return DemoMixture(
            model=model, tokenizer=tokenizer, name="the embedded default mixture", card=card, examples=examples
        )
    name = str(mixture)
    model = _load_model(name, revision=revision, token=token)
    tokenizer = load_tokenizer(name, revision=revision, token=token)
    card = read_model_card(name, revision=revision, token=token)
    return DemoMixture(model=model, tokenizer=tokenizer, name=name, revision=revision, card=card)
