"""The mixture and tokenizer a command loads, with the command's Hub, dtype and device options."""

from __future__ import annotations

import argparse
from typing import Any

from ..refs import is_local_argument
from .options import hub_kwargs, torch_dtype


def load_model(args: argparse.Namespace, mixture: str):
    """The mixture named on the command line, loaded with the command's Hub, dtype and device options."""
    from .. import load_mixture  # the package face: the loader moves to the model layer (issue 11)

    return load_mixture(
        mixture,
        revision=getattr(args, "revision", None),
        torch_dtype=torch_dtype(getattr(args, "dtype", None)),
        device=getattr(args, "device", None),
        **hub_kwargs(args),
    )


def load_tokenizer(model: Any, args: argparse.Namespace):
    """The tokenizer of the mixture's base model (or ``--tokenizer``), with the same Hub options."""
    # TODO(R1): hub.load_tokenizer (the one loader: mixture folder first, then the base model)
    from transformers import AutoTokenizer

    from ..errors import InvalidMixtureError

    override = getattr(args, "tokenizer", None)
    base = model.xlora_config.base_model
    if override:
        name, revision = override, None
    elif base is not None:
        name, revision = base.repo_id, (None if is_local_argument(base.repo_id) else base.revision)
    else:
        raise InvalidMixtureError("The mixture names no base model to take the tokenizer from; pass --tokenizer.")
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, **hub_kwargs(args))
    except (OSError, ValueError) as err:
        from ..redact import redact

        why = redact(" ".join(str(err).split()), [args.token])[:160]  # redacted before it is cut
        raise InvalidMixtureError(
            f"No tokenizer could be loaded from {name!r} ({why}). Pass --tokenizer "
            "with a Hub repo id or folder that has one."
        ) from err


def load_base_model(args: argparse.Namespace, ref: Any):
    """The base model a user named (``create BASE``, ``convert --base-model``), with the command's Hub options.

    ``transformers`` says "this folder or repo holds no model" with a bare ``ValueError`` / ``OSError``; for a
    model the user named, that is the input's fault, so it becomes an :class:`~xlora_hub.errors.InvalidConfigError`
    naming the model (the Hub's own errors pass through: :func:`~xlora_hub.error_messages.format_error` words them).
    """
    # TODO(R1): the Hub room's load_base_model could word this for every caller (load_mixture too)
    from ..error_messages import format_error
    from ..errors import InvalidConfigError
    from ..hub import load_base_model as load
    from ..redact import redact

    try:
        return load(ref, **hub_kwargs(args))
    except (OSError, ValueError) as err:
        if format_error(err) is not None:
            raise
        why = redact(" ".join(str(err).split()), [args.token])[:300].rstrip(".")  # redacted before it is cut
        raise InvalidConfigError(
            f"Base model {ref.repo_id!r} could not be loaded ({why}). Give a transformers model folder (with its "
            "config.json and weights) or a Hub repo id."
        ) from err
