"""Configuration: one pydantic model per stage, one YAML file for all of them.

A YAML config holds any subset of the sections below (``synth:``, ``prepare:``,
``split:``, ...). Unknown keys and wrong types are refused with the key named. On the
command line, flags given explicitly override the config file's values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ensemblecam.errors import InputError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(Section):
    """``ensemblecam synth``: procedural phantom data in a real data set's layout."""

    layout: Literal["brats", "msd", "kits"] = Field("brats", description="on-disk layout to write")
    out: Path = Field(Path("phantom"), description="output folder")
    n_cases: int = Field(40, ge=1, description="number of cases")
    shape: tuple[int, int, int] = Field((96, 96, 64), description="volume shape (x, y, z)")
    seed: int = Field(0, description="random seed: same seed, same data")
    tumour_free_fraction: float = Field(
        0.15, ge=0.0, le=1.0, description="fraction of cases without any lesion"
    )
    workers: int = Field(2, ge=1, description="parallel processes")


class PrepareConfig(Section):
    """``ensemblecam prepare``: volumes -> 2-D slices in a slice store."""

    data: Path | None = Field(None, description="data set root folder")
    layout: Literal["brats", "msd", "kits", "folder"] = Field("brats", description="data layout")
    labels_csv: Path | None = Field(
        None, description="CSV of image-level labels (case,slice,label) for data without masks"
    )
    out: Path = Field(Path("store"), description="slice store folder to write")
    modalities: list[str] | None = Field(
        None, description="modalities in channel order (default per layout; paper: flair,t1ce,t2)"
    )
    axis: int = Field(2, ge=0, le=2, description="slice axis of the RAS+ canonical volume")
    normalise: Literal["minmax_slice", "zscore_volume", "percentile"] = Field(
        "minmax_slice", description="intensity normalisation"
    )
    percentiles: tuple[float, float] = Field(
        (0.5, 99.5), description="clip range for 'percentile' normalisation"
    )
    crop: Literal["none", "fixed", "bbox", "kidney"] = Field("none", description="crop mode")
    crop_box: tuple[int, int, int, int] | None = Field(
        None, description="fixed crop y0,y1,x0,x1 (paper: 56,184,56,184)"
    )
    crop_size: tuple[int, int] | None = Field(
        None, description="window size for bbox and kidney crops (thesis: 150,150)"
    )
    slice_range: tuple[int, int] | None = Field(
        None, description="first,last slice kept, inclusive (paper: 13,140)"
    )
    every_nth: int = Field(1, ge=1, description="keep every n-th slice")
    lesion_labels: list[int] | None = Field(
        None, description="seg labels merged into lesion (default per layout)"
    )
    min_lesion_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="slice label 1 only above this lesion fraction"
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="image dtype on disk")
    workers: int = Field(2, ge=1, description="parallel processes")


class SplitConfig(Section):
    """``ensemblecam split``: patient-level splits written as files."""

    store: Path = Field(Path("store"), description="slice store to split")
    out: Path | None = Field(None, description="split file (default <store>/splits.json)")
    scheme: Literal["kfold", "holdout", "list"] = Field("kfold", description="split scheme")
    folds: int = Field(3, ge=2, description="k for k-fold (paper: 3)")
    fractions: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="train,val,test fractions for holdout (thesis: 60/20/20)"
    )
    val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="k-fold: share of training cases kept for validation"
    )
    list_file: Path | None = Field(None, description="user split: JSON or CSV (case,part[,fold])")
    stratify: bool = Field(True, description="stratify by lesion presence per case")
    seed: int = Field(0, description="shuffle seed")


class Config(Section):
    """All stages' options; every section is optional in the YAML file."""

    synth: SynthConfig = SynthConfig()
    prepare: PrepareConfig = PrepareConfig()
    split: SplitConfig = SplitConfig()


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}"
    return f"{source}: key {key!r}: {err['msg']} (got {err.get('input')!r})"


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a YAML config; ``None`` gives the defaults. Bad files raise InputError."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config must be a mapping of sections")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise InputError(_format_error(exc, str(path))) from exc


def section(config_path: str | os.PathLike[str] | None, name: str, **overrides: Any) -> Any:
    """The ``name`` section of the config at ``config_path`` with non-None overrides applied."""
    cfg = load_config(config_path)
    sec = getattr(cfg, name)
    data = sec.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return type(sec).model_validate(data)
    except ValidationError as exc:
        raise InputError(_format_error(exc, f"--{name} options")) from exc
