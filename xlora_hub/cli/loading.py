"""The mixture and tokenizer a command loads, with the command's Hub, dtype and device options."""

from __future__ import annotations

import argparse
from typing import Any

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


def load_tokenizer(args: argparse.Namespace):
    """``--tokenizer`` if given, else the mixture's: its own folder or repo first, then its base model.

    One loader for the CLI, the Space and the library (:func:`xlora_hub.hub.load_tokenizer`), so a saved mixture
    folder whose config names ``./base_model`` finds it from any working directory.
    """
    from ..errors import InvalidMixtureError
    from ..hub import load_tokenizer as hub_load_tokenizer

    override = getattr(args, "tokenizer", None)
    try:
        if override:
            return hub_load_tokenizer(override, **hub_kwargs(args))
        return hub_load_tokenizer(args.mixture, revision=getattr(args, "revision", None), **hub_kwargs(args))
    except InvalidMixtureError as err:
        raise InvalidMixtureError(f"{err} Or pass --tokenizer with a Hub repo id or folder that has one.") from None


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
