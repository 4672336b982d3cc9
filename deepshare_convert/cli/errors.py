"""One table from exception type to a one-line message and an exit code.

Set ``DEEPSHARE_DEBUG=1`` to see the full traceback instead.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

from ..errors import DeepShareError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 1

# OS errors that say something about the user's paths or machine, not about a bug here
_USER_OS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                   errno.ENOSPC, errno.EDQUOT, errno.ENOTEMPTY, errno.ENAMETOOLONG}  # fmt: skip


def debug_enabled() -> bool:
    return os.environ.get("DEEPSHARE_DEBUG", "") not in ("", "0", "false")


def show_debug_log() -> None:
    """With ``DEEPSHARE_DEBUG=1``, deepshare's own debug log goes to stderr (e.g. the third-party
    warnings an ONNX import captured); otherwise it stays silent. Only the package's logger: the
    libraries' own debug chatter stays out."""
    if not debug_enabled():
        return
    logger = logging.getLogger("deepshare_convert")
    if not any(getattr(h, "deepshare_debug", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("deepshare: debug: %(name)s: %(message)s"))
        handler.deepshare_debug = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _is_click_exit(exc: BaseException) -> bool:
    # typer vendors its own click: match click's classes by shape, not identity
    return type(exc).__name__ == "Exit" and hasattr(exc, "exit_code")


def _is_click_usage(exc: BaseException) -> bool:
    return hasattr(exc, "show") and hasattr(exc, "exit_code")


def _usage_error(exc) -> int:
    """Click's usage errors in the same one-line form as every other error, pointing at --help."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # `deepshare` alone: the help is the answer
        exc.show()
        return exc.exit_code
    message = _one_line(exc.format_message() if hasattr(exc, "format_message") else str(exc)).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    print(f"deepshare: error: {message[:1].lower() + message[1:]}{where}", file=sys.stderr)
    return exc.exit_code


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr and return the exit code to use."""
    if _is_click_exit(exc):
        return exc.exit_code
    if _is_click_usage(exc):
        return _usage_error(exc)
    if debug_enabled():
        import traceback

        traceback.print_exception(exc)
    if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "Abort":
        print("deepshare: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, DeepShareError):
        print(f"deepshare: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, FileNotFoundError):
        print(f"deepshare: error: file not found: {exc.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(exc, OSError) and exc.errno in _USER_OS_ERRNOS and exc.filename:
        print(f"deepshare: error: cannot write {exc.filename}: {(exc.strerror or '').lower()}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(exc, MemoryError):
        print("deepshare: error: out of memory (try a smaller batch or input size)", file=sys.stderr)
        return EXIT_USER_ERROR
    print(
        f"deepshare: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
        "(set DEEPSHARE_DEBUG=1 for the traceback)",
        file=sys.stderr,
    )
    return EXIT_INTERNAL
