"""Shared CLI plumbing: one-line errors and config handling."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ensemblecam.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config; flags given here override it."),
]
StoreOption = Annotated[Path | None, typer.Option("--store", help="Slice store folder.")]
SplitsOption = Annotated[
    Path | None, typer.Option("--splits", help="Split file (default <store>/splits.json).")
]
FoldOption = Annotated[str | None, typer.Option("--fold", help="Fold position or name.")]
AcceleratorOption = Annotated[
    str | None, typer.Option("--accelerator", help="cpu, gpu, cuda, mps or auto.")
]
DevicesOption = Annotated[
    str | None, typer.Option("--devices", help="Devices per node: N or auto.")
]
NumNodesOption = Annotated[int | None, typer.Option("--num-nodes", help="Number of nodes.")]
StrategyOption = Annotated[
    str | None,
    typer.Option("--strategy", help="auto, ddp, ddp_spawn, ... (auto: ddp if >1 device)"),
]
ForceOption = Annotated[
    bool, typer.Option("--force", help="Replace existing results in the output folder.")
]


def one_line_errors(fn: F) -> F:
    """Turn an InputError into ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None

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
