"""Progress output of every stage: bars with counts and ETA, one line per finished stage.

One mode for the whole process (:func:`configure`, the CLI's ``--progress``, or the
environment variable ``ENSEMBLECAM_PROGRESS``, which worker processes inherit):

``rich``   a live display on stderr while a stage runs: one bar per loop of the stage
           (epochs and batches of a training run, batches per CAM member, chunks of the
           search and the evaluation, cases of an export), each naming the stage
           (``fold0/train/resnet18``) and showing done/total, elapsed time and ETA; bars
           vanish when done; the log lines below stay;
``plain``  no bars: the log lines only (one per epoch, one per finished stage), for log files;
``quiet``  nothing but errors (and the final results table the CLI prints);
``auto``   (default) rich when stderr is a terminal, else plain.

Log lines go to stdout: :func:`info` (an epoch's losses, what predict used) and
:func:`done` (``✓ fold0/train/resnet18  1m12s`` when a stage finishes). A stage's bars share
one display, opened by :func:`stage`; a bar made outside any stage opens its own.
A loop's ``progress`` argument (``False``: no bar, e.g. in tests and library calls) is
passed as :func:`bar`'s ``enabled``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

ENV = "ENSEMBLECAM_PROGRESS"
MODES = ("auto", "rich", "plain", "quiet")
Mode = Literal["auto", "rich", "plain", "quiet"]
T = TypeVar("T")

_stages: list[str] = []  # names of the stages running in this process, innermost last
_display: Any = None  # the rich Progress shared by the bars of the running stage(s)
_users = 0  # open bars and stages using _display


def check_mode(mode: str) -> Mode:
    """``mode`` if it is one of :data:`MODES`; else a :class:`InputError`."""
    from ensemblecam.errors import InputError

    if mode not in MODES:
        raise InputError(f"--progress {mode!r}: expected one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def mode() -> Literal["rich", "plain", "quiet"]:
    """The resolved mode of this process (``auto``: rich if stderr is a terminal)."""
    value = os.environ.get(ENV, "auto")
    if value not in MODES:
        value = "auto"
    if value == "auto":
        return "rich" if sys.stderr.isatty() else "plain"
    return value  # type: ignore[return-value]


@contextmanager
def configure(new: str | None) -> Iterator[None]:
    """Use mode ``new`` (None: keep the current one) inside the block; the environment
    variable carries it to worker processes and is restored afterwards."""
    if new is None:
        yield
        return
    check_mode(new)
    old = os.environ.get(ENV)
    os.environ[ENV] = new
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def duration(seconds: float) -> str:
    """``0.4s``, ``8.3s``, ``1m12s``, ``2h05m`` (seconds rounded down past a minute)."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def info(line: str) -> None:
    """Print a log line (stdout) unless quiet."""
    if mode() != "quiet":
        print(line, flush=True)


def done(name: str, seconds: float | None) -> None:
    """The one-line summary of a finished stage: ``✓ <name>  <time>``; ``seconds=None``: the
    stage's results were cached (``· <name>  cached``). Nothing when quiet."""
    if seconds is None:
        info(f"· {name}  cached")
    else:
        info(f"✓ {name}  {duration(seconds)}")


def _open() -> Any:
    """The shared rich display, started on first use."""
    global _display, _users
    if _display is None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        _display = Progress(
            TextColumn("[bold]{task.fields[who]}[/] {task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[postfix]}"),
            console=Console(stderr=True),
            transient=True,
        )
        _display.start()
    _users += 1
    return _display


def _close() -> None:
    global _display, _users
    _users -= 1
    if _users <= 0 and _display is not None:
        _display.stop()
        _display, _users = None, 0


@contextmanager
def stage(name: str) -> Iterator[None]:
    """A stage runs inside this block: its bars are named ``name`` and share one display."""
    _stages.append(name)
    rich = mode() == "rich"
    if rich:
        _open()
    try:
        yield
    finally:
        _stages.pop()
        if rich:
            _close()


class Bar:
    """A progress bar (or nothing, when bars are off): ``update``, ``set_postfix``,
    ``reset``, ``close``; iterating it iterates the wrapped iterable and advances by 1."""

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        total: int | None,
        desc: str,
        unit: str,
        label: str,
        enabled: bool | None,
        completed: int = 0,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.display = None
        self.task = None
        if enabled is not False and mode() == "rich":
            self.display = _open()
            who = _stages[-1] if _stages else label
            self.task = self.display.add_task(
                desc, total=total, completed=completed, who=who, unit=unit, postfix=""
            )

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        if self.task is not None:
            self.display.advance(self.task, n)

    def set_postfix(self, **values: Any) -> None:
        if self.task is not None:
            text = " ".join(f"{k} {v}" for k, v in values.items())
            self.display.update(self.task, postfix=text)

    def reset(self, desc: str, total: int | None = None) -> None:
        """Start over at 0 with a new description (the next epoch's batches)."""
        if self.task is not None:
            self.display.reset(self.task, total=total, description=desc)

    def close(self) -> None:
        if self.task is not None:
            self.display.remove_task(self.task)
            self.task = None
            _close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def bar(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "",
    label: str = "",
    enabled: bool | None = None,
    completed: int = 0,
) -> Bar:
    """A bar over ``iterable`` (or ``total`` steps, advanced by ``update``). Shown only in
    rich mode and unless ``enabled`` is False; named by the running stage, else ``label``."""
    return Bar(iterable, total, desc, unit, label, enabled, completed)
