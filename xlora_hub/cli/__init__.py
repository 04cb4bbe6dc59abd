"""The ``xlora-hub`` command: from LoRA experts to a published, tested X-LoRA mixture.

A thin layer over the library: every sub-command parses its arguments, calls one or two library
functions (:mod:`xlora_hub.hub`, :mod:`xlora_hub.convert`, :mod:`xlora_hub.training`,
:mod:`xlora_hub.space`) and prints the result. User errors (a missing file, a bad expert ref, an
unknown repo, a bad JSONL line) exit with status 1 and a one-line message (at most
:data:`MAX_ERROR_CHARS` characters, worded by :func:`xlora_hub.error_messages.format_error`); any other
exception is a bug and prints its traceback; ``--debug`` prints the traceback of every error. Bad usage
exits with status 2, as argparse does.

Tokens are taken from ``--token`` (stripped of surrounding whitespace, as ``huggingface_hub`` does for
``HF_TOKEN``), else ``HF_TOKEN`` or the ``huggingface_hub`` login (``token=None`` is passed through), and
are never printed: every error line, warning and traceback goes through :func:`xlora_hub.redact.redact`.

The package: :mod:`.app` (parser and :func:`main`), :mod:`.options` (what commands share),
:mod:`.errors` and :mod:`.output` (how errors, warnings and logs are shown), and one module per command
(:mod:`.create`, :mod:`.train`, :mod:`.info`, :mod:`.generate`, :mod:`.push`, :mod:`.pull`, :mod:`.convert`,
:mod:`.demo`, :mod:`.space`, :mod:`.bench`), each with its ``add_command`` and ``cmd_<name>``.
"""

from __future__ import annotations

from ..routing import Generation, RoutedToken, generate_text
from .app import build_parser, main
from .bench import BENCH_SCRIPT
from .errors import MAX_ERROR_CHARS, one_line
from .expert_args import default_expert_name, expert_refs, parse_named_ref
from .generate import format_routing
from .options import EXIT_OK, EXIT_USAGE, EXIT_USER_ERROR, PROG, UsageError
from .output import output_settings

__all__ = [
    "BENCH_SCRIPT",
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_USER_ERROR",
    "MAX_ERROR_CHARS",
    "PROG",
    "Generation",
    "RoutedToken",
    "UsageError",
    "build_parser",
    "default_expert_name",
    "expert_refs",
    "format_routing",
    "generate_text",
    "main",
    "one_line",
    "output_settings",
    "parse_named_ref",
]
