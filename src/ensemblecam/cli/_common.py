"""Shared CLI plumbing: one-line errors, interruption, output checks and config handling.

Every command is wrapped by :func:`one_line_errors`:

- a bad input (:class:`InputError`) prints ``error: <message>`` (one line) and exits 2;
- an ``OSError`` about a named file caused by the user's environment (permission
  denied, read-only file system, disk full, not a folder, ...) prints
  ``error: <file>: <reason>`` and exits 2; any other exception is a bug and keeps its
  traceback;
- SIGINT (Ctrl-C) / SIGTERM print ``interrupted; rerun the same command to resume``
  and exit 130 / 143 (128 + signal number); partial results are left in place, so the
  same command resumes from them.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from ensemblecam.config import one_line
from ensemblecam.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])

ForceOption = Annotated[
    bool, typer.Option("--force", help="Replace existing results in the output folder.")
]

ProgressOption = Annotated[
    str,
    typer.Option(
        "--progress",
        envvar="ENSEMBLECAM_PROGRESS",
        metavar="<auto|rich|plain|quiet>",
        help="Progress output: rich (bars with counts and ETA, and one line per finished "
        "stage), plain (the lines without bars, for logs), quiet (errors and the final "
        "table only); auto: rich on a terminal, else plain. [default: auto]",
        show_default=False,
    ),
]


INTERRUPTED = "interrupted; rerun the same command to resume"

#: errno values of an OSError that come from the user's files and system, not from a bug
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EACCES",
        "EPERM",
        "EROFS",
        "ENOSPC",
        "EDQUOT",
        "ENOENT",
        "ENOTDIR",
        "EISDIR",
        "EEXIST",
        "ENOTEMPTY",
        "ENAMETOOLONG",
        "ELOOP",
        "EFBIG",
        "EMFILE",
        "ENFILE",
        "EIO",
        "EXDEV",
        "EBUSY",
        "ETXTBSY",
    )
    if hasattr(errno, name)
)


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM while a command runs (like KeyboardInterrupt)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def oserror_line(exc: OSError) -> str | None:
    """``<file>: <reason>`` for an OSError about a named file from the environment, else
    None (an unnamed or unexpected OSError is a bug: its traceback is kept)."""
    if exc.filename is None or exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {exc.strerror or os.strerror(exc.errno)}"


def one_line_errors(fn: F) -> F:
    """Run a command: bad inputs and environment OSErrors as ``error: ...`` (exit 2),
    SIGINT/SIGTERM as ``interrupted; ...`` (exit 130/143); see the module docstring."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            raise typer.Exit(2) from None
        except OSError as exc:
            line = oserror_line(exc)
            if line is None:
                raise
            print(f"error: {one_line(line)}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            raise typer.Exit(128 + signal.SIGINT) from None
        except Terminated:
            print(INTERRUPTED, file=sys.stderr)
            raise typer.Exit(128 + signal.SIGTERM) from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, old)

    return wrapper  # type: ignore[return-value]


def int_or_str(value: str | None) -> int | str | None:
    """``"3"`` -> 3, ``"auto"`` / ``"fold-a"`` stay strings; None stays None (--devices, --fold)."""
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value


def json_object(value: str | None, flag: str) -> dict[str, Any] | None:
    """Parse ``flag``'s value as a JSON object; None stays None."""
    if value is None:
        return None
    try:
        obj = json.loads(value)
    except ValueError as exc:
        raise InputError(f"{flag} {value!r}: not a JSON object ({exc})") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{flag} {value!r}: not a JSON object")
    return obj


def split_csv(value: str | None, cast: Callable[[str], Any] = str) -> list[Any] | None:
    """``"a,b,c"`` -> ``["a", "b", "c"]`` (cast applied); None stays None."""
    if value is None:
        return None
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise InputError(f"{value!r}: not a comma-separated list of {cast.__name__}") from exc
