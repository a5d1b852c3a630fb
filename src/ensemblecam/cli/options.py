"""CLI flags generated from the pydantic config sections (one source of truth).

:func:`config_command` registers a stage command whose flags are the fields of its config
section: field ``batch_size`` is ``--batch-size``, its ``Field(description=...)`` is the help
and its default is shown. A command reads ``--config FILE.yaml`` (section ``<name>:``) and
then applies every flag given on the command line on top; a flag not given leaves the YAML
value (or the default). Values on the command line:

- ``bool``: ``--x/--no-x``;
- ``Literal``: one of the choices (shown in the help);
- ``list[...]``: comma-separated, the flag may be repeated (``--methods a,b --methods c``);
- ``tuple[...]``: comma-separated, e.g. ``--shape 96,96,64``;
- ``dict``: a JSON object, e.g. ``--model-args '{"widen_factor": 0.5}'``;
- ``int | str`` (``--fold``, ``--devices``): digits give an int, anything else a string.

Every value is checked by the config model; a bad one is refused as
``error: --flag 'value': <what is wrong>`` (exit 2), like a bad YAML value.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from ensemblecam.cli._common import (
    ProgressOption,
    int_or_str,
    json_object,
    one_line_errors,
    split_csv,
)
from ensemblecam.config import Config, load_config, one_line, short_repr
from ensemblecam.errors import InputError

_LABELS: dict[Any, str] = {int: "int", float: "float", str: "str", Path: "path"}


def _members(tp: Any) -> tuple[Any, ...]:
    """The non-None members of a union annotation (``(tp,)`` for anything else)."""
    if get_origin(tp) in (Union, types.UnionType):
        return tuple(a for a in get_args(tp) if a is not type(None))
    return (tp,)


def _label(tp: Any) -> str:
    """Readable name of a scalar annotation: ``int``, ``path``, ``fp32|bf16``, ``int|str``
    (constraints of an ``Annotated`` type are left to pydantic's message)."""
    if get_origin(tp) is Annotated:
        return _label(get_args(tp)[0])
    if get_origin(tp) is Literal:
        return "|".join(str(c) for c in get_args(tp))
    members = _members(tp)
    if len(members) > 1:
        return "|".join(_label(m) for m in members)
    return _LABELS.get(tp, getattr(tp, "__name__", str(tp)).lower())


def _scalar(tp: Any, raw: str) -> Any:
    """A command-line string as the value the model validates: a Literal's choice whose text
    is ``raw``, an int for digits when ``tp`` is ``int | str``; else ``raw`` (pydantic
    converts it or says what is wrong)."""
    if get_origin(tp) is Literal:
        return next((c for c in get_args(tp) if str(c) == raw), raw)
    members = _members(tp)
    if int in members and str in members:
        return int_or_str(raw)
    return raw


@dataclass(frozen=True)
class Flag:
    """One config field as a command-line flag."""

    field: str  #: field name (also the Python parameter name)
    flag: str  #: ``--kebab-case`` name
    kind: str  #: bool, list, tuple, json or scalar
    annotation: Any  #: the field's annotation without None

    def convert(self, raw: Any) -> Any:
        """The command-line value as the field's input (None: flag not given)."""
        if raw is None or (self.kind == "list" and not raw):
            return None
        if self.kind == "bool":
            return raw
        if self.kind == "json":
            return json_object(raw, self.flag)
        if self.kind == "list":
            (elem,) = get_args(self.annotation)
            return [_scalar(elem, v) for item in raw for v in split_csv(item) or []]
        if self.kind == "tuple":
            args = get_args(self.annotation)
            items = split_csv(raw) or []
            if len(items) != len(args):
                raise InputError(
                    f"{self.flag} {short_repr(raw)}: expected {len(args)} "
                    f"comma-separated values {self.metavar()}"
                )
            return [_scalar(t, v) for t, v in zip(args, items, strict=True)]
        return _scalar(self.annotation, raw)

    def metavar(self) -> str:
        """How the value is written: ``<int>``, ``<sgd|adam|adamw>``, ``<str,...>``, ..."""
        args = get_args(self.annotation)
        if self.kind == "list":
            return f"<{_label(args[0])},...>"
        if self.kind == "tuple":
            return f"<{','.join(_label(a) for a in args)}>"
        if self.kind == "json":
            return "<json>"
        return f"<{_label(self.annotation)}>"


def make_flag(name: str, info: FieldInfo, flag: str | None = None) -> Flag:
    """The :class:`Flag` of field ``name`` (``flag`` overrides the ``--kebab-case`` name)."""
    members = _members(info.annotation)
    tp = members[0] if len(members) == 1 else Union[members]  # noqa: UP007 (runtime union)
    origin = get_origin(tp)
    kind = (
        "bool"
        if tp is bool
        else "list"
        if origin is list
        else "tuple"
        if origin is tuple
        else "json"
        if origin is dict
        else "scalar"
    )
    return Flag(name, flag or "--" + name.replace("_", "-"), kind, tp)


def default_text(flag: Flag, info: FieldInfo) -> str | None:
    """The field's default as written on the command line; None if there is none to show."""
    value = info.get_default(call_default_factory=True)
    if value is None or (isinstance(value, (list, tuple, dict)) and not value):
        return None
    if flag.kind == "bool":
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def flag_help(flag: Flag, info: FieldInfo) -> str:
    """The help of a flag: the field's description and its default."""
    text = info.description or ""
    default = default_text(flag, info)
    return f"{text} [default: {default}]" if default is not None else text


def _option(flag: Flag, info: FieldInfo) -> inspect.Parameter:
    if flag.kind == "bool":
        decl, tp = f"{flag.flag}/--no-{flag.flag[2:]}", bool | None
        opt = typer.Option(decl, help=flag_help(flag, info), show_default=False)
    else:
        tp = list[str] | None if flag.kind == "list" else str | None
        opt = typer.Option(
            flag.flag, help=flag_help(flag, info), metavar=flag.metavar(), show_default=False
        )
    return inspect.Parameter(
        flag.field, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[tp, opt]
    )


def ordered_fields(model: type[BaseModel]) -> list[str]:
    """The model's fields, its own first, then those of its bases (devices last)."""
    names: list[str] = []
    for klass in model.__mro__:
        for name in getattr(klass, "__annotations__", {}):
            if name in model.model_fields and name not in names:
                names.append(name)
    return names


def section_flags(name: str, renames: Mapping[str, str] | None = None) -> list[Flag]:
    """One :class:`Flag` per field of config section ``name`` (help order)."""
    model = section_model(name)
    renames = renames or {}
    return [make_flag(f, model.model_fields[f], renames.get(f)) for f in ordered_fields(model)]


def section_model(name: str) -> type[BaseModel]:
    """The pydantic model of config section ``name``."""
    annotation = Config.model_fields[name].annotation
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation


def merged_section(
    config: str | os.PathLike[str] | None, name: str, values: Mapping[Flag, Any]
) -> Any:
    """Section ``name`` of the YAML ``config`` (defaults if None) with every flag given on
    the command line (value not None) applied on top and validated."""
    sec = getattr(load_config(config), name)
    for flag, raw in values.items():
        value = flag.convert(raw)
        if value is None:
            continue
        try:
            setattr(sec, flag.field, value)
        except ValidationError as exc:
            shown = raw if not isinstance(raw, list) else ",".join(raw)
            msg = one_line(exc.errors()[0]["msg"])
            raise InputError(f"{flag.flag} {short_repr(shown)}: {msg}") from exc
    return sec


def config_option(name: str) -> inspect.Parameter:
    """``--config/-c FILE.yaml``: the YAML whose ``name:`` section the flags override."""
    opt = typer.Option(
        "--config",
        "-c",
        help=f"YAML config; its '{name}:' section is read and the flags given here override it.",
        metavar="<path>",
    )
    return inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Path | None, opt],
    )


def config_command(
    app: typer.Typer,
    name: str,
    section: str | None = None,
    *,
    renames: Mapping[str, str] | None = None,
) -> Callable[[Callable], Callable]:
    """Register ``fn(cfg, **extras)`` as ``ensemblecam <name>``.

    The command's flags: ``--config`` (unless ``fn`` takes ``config`` itself, then it is
    passed on), ``fn``'s own parameters after ``cfg`` (command-specific extras, declared
    with ``typer.Option``/``typer.Argument``), then one flag per field of config section
    ``section`` (default ``name``), named ``--kebab-case`` unless ``renames`` says otherwise.
    ``cfg`` is that section read from the YAML with the given flags applied. Every
    command also takes ``--progress`` (:mod:`ensemblecam.progress`), applied while it runs.
    """
    sec_name = section or name

    def register(fn: Callable) -> Callable:
        flags = section_flags(sec_name, renames)
        model = section_model(sec_name)
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        takes_config = any(p.name == "config" for p in own)
        clash = ({p.name for p in own} | {"progress"}) & {f.field for f in flags}
        assert not clash, f"{name}: parameters {clash} are also config fields"
        params = [] if takes_config else [config_option(sec_name)]
        params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        params += [_option(f, model.model_fields[f.field]) for f in flags]
        params.append(
            inspect.Parameter(
                "progress", inspect.Parameter.KEYWORD_ONLY, default="auto",
                annotation=ProgressOption,
            )
        )  # fmt: skip

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            from ensemblecam import progress

            config = kwargs["config"] if takes_config else kwargs.pop("config")
            mode = progress.check_mode(kwargs.pop("progress"))
            cfg = merged_section(config, sec_name, {f: kwargs.pop(f.field) for f in flags})
            with progress.configure(mode):
                return fn(cfg, **kwargs)

        del command.__wrapped__  # typer must read the signature below, not fn's
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {}
        app.command(name)(one_line_errors(command))
        return fn

    return register
