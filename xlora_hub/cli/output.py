"""What a command prints besides its result: log lines, warnings and progress bars, with every secret redacted.

:func:`output_settings` is entered around each command by :func:`xlora_hub.cli.main` and restores everything
on exit, so calling ``main`` in-process (as the tests do) changes nothing global.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence

from ..redact import redact
from .options import PROG

__all__ = ["output_settings"]


class _RedactingFilter(logging.Filter):
    """Redacts the secrets out of every log record a handler prints (message and traceback)."""

    def __init__(self, secrets: Sequence[str | None]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), self.secrets), None
        if record.exc_info:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)), self.secrets).rstrip()
            record.exc_info = None
        return True


def _redacting_showwarning(secrets: Sequence[str | None]) -> Callable[..., None]:
    """``warnings.showwarning`` with the secrets redacted from the printed warning."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        (file or sys.stderr).write(redact(text, secrets))

    return show


@contextlib.contextmanager
def output_settings(*, quiet: bool, debug: bool, secrets: Sequence[str | None] = ()) -> Iterator[None]:
    """For one command: progress bars off with ``-q``, xlora-hub's log records as ``xlora-hub: warning: ...``
    lines, transformers' chatter and third-party deprecation warnings hidden unless ``--debug``, and the
    ``secrets`` redacted from every warning and log line (ours, huggingface_hub's, transformers', the root
    logger's). Everything is restored afterwards, so calling :func:`main` in-process changes nothing global."""
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    tf_logging = transformers.utils.logging
    package_logger = logging.getLogger("xlora_hub")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    redacting = _RedactingFilter(secrets)
    handlers = {handler}
    for name in (None, "huggingface_hub", "transformers"):
        handlers.update(logging.getLogger(name).handlers)
    for each in handlers:
        each.addFilter(redacting)
    saved = (
        package_logger.level,
        package_logger.propagate,
        tf_logging.get_verbosity(),
        are_progress_bars_disabled(),
        tf_logging.is_progress_bar_enabled(),
    )
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING))
    package_logger.propagate = False
    tf_logging.set_verbosity(tf_logging.INFO if debug else tf_logging.ERROR)
    if quiet:
        disable_progress_bars()
        tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _redacting_showwarning(secrets)
            if not debug:
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for each in handlers:
            each.removeFilter(redacting)
        package_logger.removeHandler(handler)
        package_logger.setLevel(saved[0])
        package_logger.propagate = saved[1]
        tf_logging.set_verbosity(saved[2])
        if quiet and not saved[3]:
            enable_progress_bars()
        if quiet and saved[4]:
            tf_logging.enable_progress_bar()
