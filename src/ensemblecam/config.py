"""Configuration: one pydantic model per stage, one YAML file for all of them.

A YAML config holds any subset of the sections below (``synth:``, ``prepare:``,
``split:``, ...). Unknown keys and wrong types are refused with the key named. On the
command line, flags given explicitly override the config file's values.

Limits: a config file is UTF-8 text of at most ``MAX_YAML_BYTES`` (1 MiB), read with
PyYAML's safe loader (no Python objects) with at most ``MAX_YAML_ALIASES`` alias uses
(``*name``) and a size (nodes + scalar characters) of at most ``MAX_YAML_NODES`` (4 Mi)
once aliases are expanded, so an "alias bomb" is refused before it is expanded. Values
quoted in error messages are cut to ``MAX_SHOWN`` (300) characters.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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
        None,
        description="CSV case,slice,label of image-level labels of every slice (slice = "
        "index along the canonical slice axis); seg files are then optional: cases with one "
        "keep their masks (calibration, scores)",
    )
    out: Path = Field(Path("store"), description="slice store folder to write")
    masks: bool = Field(
        True,
        description="read seg files; off: unlabelled scans, slice labels unknown (-1, for predict)",
    )
    modalities: list[str] | None = Field(
        None,
        description="modalities in channel order (default per layout: brats "
        "flair,t1ce,t2 as in the paper; msd adc; kits ct; folder all found)",
    )
    axis: int = Field(
        2, ge=0, le=2, description="slice axis of the RAS+ canonical volume (2 = axial)"
    )
    normalise: Literal["minmax_slice", "zscore_volume", "percentile", "ct_window"] | None = Field(
        None,
        description="intensity normalisation (default per layout: kits ct_window; brats, "
        "msd, folder percentile, per volume; the paper configs: minmax_slice, per slice)",
    )
    percentiles: tuple[float, float] = Field(
        (0.5, 99.5), description="clip range for 'percentile' normalisation"
    )
    window: tuple[float, float] = Field(
        (50.0, 400.0),
        description="level,width (HU) of 'ct_window' normalisation (default: the standard "
        "abdominal soft-tissue window L50 W400, i.e. -150..250 HU)",
    )
    crop: Literal["none", "fixed", "bbox", "kidney"] = Field("none", description="crop mode")
    crop_box: tuple[int, int, int, int] | None = Field(
        None,
        description="fixed crop y0,y1,x0,x1 (paper: 56,184,56,184); may reach outside "
        "the slice (zero padding)",
    )
    crop_size: tuple[int, int] | None = Field(
        None,
        description="h,w window of bbox crops (default: the largest bbox, a multiple of "
        "8) and kidney crops (default and thesis: 150,150)",
    )
    slice_range: tuple[int, int] | None = Field(
        None, description="first,last slice kept, inclusive (paper: 13,140)"
    )
    every_nth: int = Field(1, ge=1, description="keep every n-th slice (thesis: 5)")
    lesion_labels: list[int] | None = Field(
        None,
        description="seg labels merged into the lesion (default per layout: brats "
        "1,2,4; msd 1,2; kits 2,3; folder any non-zero)",
    )
    min_lesion_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="slice label 1 only if lesion pixels / crop pixels exceed this",
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="image dtype on disk")
    nonfinite: Literal["error", "replace"] = Field(
        "error",
        description="NaN/Inf voxels: refuse the file, or replace them by the "
        "volume's finite minimum (0 if none) and print how many",
    )
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
        0.2,
        ge=0.0,
        lt=1.0,
        description="k-fold: share of the non-test cases kept for validation (0: none)",
    )
    list_file: Path | None = Field(
        None,
        description="user split for scheme list: JSON {train,val,test} (or a list of "
        "them) or CSV case,part[,fold]",
    )
    stratify: bool = Field(True, description="stratify by lesion presence per case")
    seed: int = Field(0, description="shuffle seed")


class DeviceConfig(Section):
    """Devices through Lightning Fabric (shared by train, cam and unet)."""

    accelerator: str = Field("auto", description="cpu, gpu, cuda, mps or auto")
    devices: int | str = Field(
        1, description="devices per node: a number, a list of indices such as 0,1, or auto"
    )
    num_nodes: int = Field(1, ge=1, description="number of nodes")
    strategy: str = Field(
        "auto", description="auto, ddp, ddp_spawn, ... (auto: ddp if more than one device)"
    )
    precision: str = Field("32-true", description="32-true, 16-mixed, bf16-mixed, ...")


#: Named training recipes (``train.preset``); any recipe field set in the config overrides
#: the preset's value.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.0, batch_size=32, epochs=10,
        scheduler="none", step_size=40, gamma=0.1, augment="none",
    ),
    "thesis": dict(
        optimizer="adam", lr=1e-2, momentum=0.0, weight_decay=0.0, batch_size=60, epochs=50,
        scheduler="step", step_size=40, gamma=0.1, augment="none",
    ),
}  # fmt: skip


def _describe_presets() -> str:
    """``paper = optimizer sgd, lr 0.001, ...; thesis = ...`` (the help of ``--preset``)."""
    return "; ".join(
        f"{name} = " + ", ".join(f"{k} {v}" for k, v in recipe.items())
        for name, recipe in PRESETS.items()
    )


_FROM_PRESET = "(default: from the preset)"


class TrainConfig(DeviceConfig):
    """``ensemblecam train``: a slice classifier on one fold; recipe fields left None come
    from ``preset`` (see ``PRESETS``)."""

    store: Path = Field(Path("store"), description="slice store to train on")
    splits: Path | None = Field(None, description="split file (default <store>/splits.json)")
    fold: int | str = Field(0, description="fold position or name in the split file")
    val_part: Literal["val", "test"] = Field(
        "val", description="split part used for validation/checkpoint selection"
    )
    out: Path = Field(Path("runs/train"), description="run output folder")
    model: str = Field(
        "resnet34", description="model name: resnet18/34/50/101, vgg19, simplecnn, timm:<name>, ..."
    )
    model_args: dict[str, Any] = Field(
        default_factory=dict,
        description='extra model keyword arguments, e.g. {"widen_factor": 0.5}',
    )
    output_stride: int | None = Field(
        None,
        description="built-in ResNets: 16 or 8 replaces the stride of layer4 (16) or "
        "layer3 and layer4 (8) by dilation, for finer CAMs (default: the network's own, 32)",
    )
    weights: Path | None = Field(
        None, description="local pretrained weights file (optional; nothing is downloaded)"
    )
    preset: Literal["paper", "thesis"] = Field(
        "paper",
        description="named training recipe; the recipe options below that are not "
        f"set take its values: {_describe_presets()}",
    )
    epochs: int | None = Field(None, ge=1, description=f"training epochs {_FROM_PRESET}")
    batch_size: int | None = Field(None, ge=1, description=f"batch size per device {_FROM_PRESET}")
    lr: float | None = Field(None, gt=0, description=f"learning rate {_FROM_PRESET}")
    optimizer: Literal["sgd", "adam", "adamw"] | None = Field(
        None, description=f"optimizer {_FROM_PRESET}"
    )
    momentum: float | None = Field(None, ge=0, description=f"SGD momentum {_FROM_PRESET}")
    weight_decay: float | None = Field(None, ge=0, description=f"weight decay {_FROM_PRESET}")
    scheduler: Literal["none", "step", "cosine"] | None = Field(
        None,
        description="learning-rate schedule: none, step decay (step_size, gamma) or "
        f"cosine {_FROM_PRESET}",
    )
    step_size: int | None = Field(
        None, ge=1, description=f"step decay every n epochs {_FROM_PRESET}"
    )
    gamma: float | None = Field(None, gt=0, description=f"step decay factor {_FROM_PRESET}")
    augment: Literal["none", "blur"] | None = Field(
        None, description=f"augmentation: none or Gaussian blur {_FROM_PRESET}"
    )
    blur_sigma: tuple[float, float] = Field((0.25, 1.0), description="Gaussian blur sigma range")
    blur_prob: float = Field(0.5, ge=0, le=1, description="probability of blurring a slice")
    imbalance: Literal["none", "weighted_loss", "weighted_sampler"] = Field(
        "none", description="class imbalance handling"
    )
    monitor: Literal["auroc", "val_loss", "f1", "accuracy"] = Field(
        "auroc", description="validation metric choosing best.pt"
    )
    threshold: float = Field(0.5, gt=0, lt=1, description="lesion probability threshold")
    seed: int = Field(0, description="seed of initialisation and data order")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    resume: bool = Field(False, description="continue an interrupted run from last.pt")
    force: bool = Field(False, description="replace an existing run")


class SearchConfig(Section):
    """``ensemblecam search``: operator x thresholds x members on calibration data."""

    store: Path = Field(Path("store"), description="slice store (with masks)")
    splits: Path | None = Field(None, description="split file (default <store>/splits.json)")
    fold: str = Field("0", description="fold position or name")
    part: Literal["train", "val", "test"] = Field("train", description="calibration part")
    maps: Path = Field(Path("maps"), description="map store root (one folder per member)")
    members: list[str] = Field(
        default_factory=list, description="member folder names, e.g. resnet34__gradcam"
    )
    label_members: list[str] | None = Field(
        None,
        description="the members the labels criterion may combine (default: all of members; "
        "run leaves out the MIL localisers after the first, which only masks can judge)",
    )
    operators: list[str] = Field(
        ["and", "or", "min", "max"], description="and, or, min, max, vote[:k], mean"
    )
    grid: str = Field(
        "0:0.9:0.1",
        description="thresholds start:stop:step or a,b,c (at most 10,001; a "
        "search scores at most 1,000,000 configurations)",
    )
    objective: str = Field(
        "paper_miou", description="metric that ranks configurations (criterion masks)"
    )
    criterion: Literal["auto", "masks", "labels"] = Field(
        "auto",
        description="what chooses the configuration: masks (objective on the annotated "
        "cases), labels (slice labels only: fp_budget) or auto (masks if the calibration "
        "part has an annotated case, else labels)",
    )
    fp_budget: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="labels criterion: largest share of the pixels of lesion-free slices "
        "called lesion",
    )
    compare_labels: bool = Field(
        True,
        description="criterion masks: also record what the labels criterion picks "
        "(best_labels.json; a results row)",
    )
    slices: Literal["all", "lesion"] = Field(
        "all",
        description="criterion masks: the annotated slices scored: all, or only those labelled "
        "lesion (how pseudo-labels see a configuration: refine makes every lesion-free slice "
        "background whatever the maps say; run's pseudo-label search)",
    )
    gate: bool = Field(False, description="also search classifier gating")
    gate_grid: str = Field("0.1:0.9:0.1", description="gate probability thresholds")
    max_members: int | None = Field(None, ge=1, description="largest member subset searched")
    calibration_cases: str = Field(
        "all", description="annotated cases used: N, 'all', or a list N1,N2,all (table)"
    )
    seed: int = Field(0, description="seed for the choice of calibration cases")
    min_lesion_fraction: float = Field(
        0.02, ge=0.0, lt=1.0, description="slice_*_large: lesion > this share (thesis 2%)"
    )
    classifier_threshold: float = Field(0.5, description="prob >= this: slice called positive")
    chunk: int = Field(128, ge=1, description="slices per chunk")
    top_k: int = Field(
        20, ge=0, description="slice/case metrics for the K best rows per operator (0: all)"
    )
    out: Path = Field(Path("search"), description="output folder")


class EvaluateConfig(Section):
    """``ensemblecam evaluate``: a chosen configuration on held-out data, every metric."""

    config_file: Path = Field(
        Path("search/best.json"), description="chosen configuration (best.json of search)"
    )
    store: Path = Field(Path("store"), description="slice store (masks read only to score)")
    splits: Path | None = Field(None, description="split file (default <store>/splits.json)")
    fold: str = Field("0", description="fold position or name")
    part: Literal["train", "val", "test"] = Field("test", description="evaluated part")
    maps: Path = Field(Path("maps"), description="map store root")
    min_lesion_fraction: float = Field(
        0.02, ge=0.0, lt=1.0, description="slice_*_large: lesion > this share (thesis 2%)"
    )
    classifier_threshold: float = Field(0.5, description="prob >= this: slice called positive")
    hd95: bool = Field(False, description="also compute HD95 per case (voxels)")
    nsd_tolerance_mm: float = Field(
        1.0, ge=0.0, allow_inf_nan=False, description="normalised surface Dice tolerance (mm)"
    )
    chunk: int = Field(256, ge=1, description="slices per chunk")
    out: Path = Field(Path("eval"), description="output folder")


class CamConfig(DeviceConfig):
    """``ensemblecam cam``: CAM maps of every slice of a split for each (checkpoint, method)."""

    store: Path = Field(Path("store"), description="slice store")
    splits: Path | None = Field(None, description="split file (default <store>/splits.json)")
    fold: int | str = Field(0, description="fold position or name in the split file")
    parts: list[str] = Field(
        ["train", "val", "test"], description="split parts (train, val, test) or all"
    )
    checkpoints: list[Path] = Field(
        default_factory=list, description="classifier checkpoints (best.pt of train)"
    )
    tags: list[str] | None = Field(
        None, description="model tag per checkpoint (default: the checkpoint's folder name)"
    )
    methods: list[str] = Field(
        ["gradcam"],
        description="cam, gradcam, gradcampp, smoothgradcampp, xgradcam, layercam, scorecam",
    )
    out: Path = Field(Path("maps"), description="map store root (one folder per member)")
    layer: str | None = Field(None, description="target layer (dotted name; default automatic)")
    layers: list[str] | None = Field(
        None,
        description="several target layers whose maps are fused (each upsampled and "
        "normalised, then averaged and normalised again); replaces layer (which may then "
        "only name one of them)",
    )
    flip_tta: bool = Field(
        False,
        description="horizontal-flip test-time augmentation: a slice's map is the mean of "
        "its map and the flipped-back map of its mirror image, its probability the mean",
    )
    target: str = Field("lesion", description="target class: lesion, predicted or an index")
    dtype: Literal["float16", "uint8", "float32"] = Field("float16", description="map dtype")
    raw: bool = Field(False, description="store un-normalised maps (float16/float32 only)")
    batch_size: int = Field(32, ge=1, description="slices per batch")
    smooth_n: int = Field(8, ge=1, description="Smooth Grad-CAM++: noisy inputs per slice")
    smooth_sigma: float = Field(0.1, ge=0, description="Smooth Grad-CAM++: noise std (input units)")
    top_k: int | None = Field(None, ge=1, description="Score-CAM approximation: top-k channels")
    score_batch: int = Field(256, ge=1, description="Score-CAM masked inputs per forward pass")
    score_precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Score-CAM masked passes: fp32 (exact) or bf16 with fp32 re-scoring of the "
        "most influential channels until the estimated map error is <= score_tol",
    )
    score_tol: float = Field(
        1e-3, ge=0, description="Score-CAM bf16: target max error of a normalised map (inf: none)"
    )
    seed: int = Field(0, description="seed of Smooth Grad-CAM++ noise")
    force: bool = Field(False, description="replace existing members")


def check_localiser_name(name: str) -> None:
    """Refuse (ValueError) a MIL localiser name that cannot name its folders: ``mil``, then
    lower-case letters, digits or single ``_`` (never a member name's ``__``)."""
    if not re.fullmatch(r"mil[a-z0-9_]*", name) or "__" in name:
        raise ValueError(
            f"localiser name {short_repr(name)}: expected mil, then letters, digits or single _"
        )


class RunConfig(Section):
    """``ensemblecam run``: the whole protocol per fold (sections above give each stage's
    options; the run sets the paths)."""

    out: Path = Field(Path("runs/run"), description="run folder")
    models: list[str] = Field(
        ["resnet34", "resnet50"], description="classifiers trained per fold (ensemble members)"
    )
    folds: list[int] | None = Field(None, description="fold positions to run (default: all)")
    calibration_part: Literal["train", "val"] = Field(
        "train", description="part the thresholds are searched on (paper: train; thesis: val)"
    )
    eval_part: Literal["val", "test"] = Field("test", description="held-out part reported")
    unet: bool = Field(True, description="fully supervised U-Net baseline (upper bound)")
    pseudo_unet: bool = Field(
        True,
        description="U-Net self-trained on the refined pseudo-labels of the training part: "
        "the final masks (export/, predict) when on; the paper configs turn it off",
    )
    mil: bool = Field(
        True,
        description="also train a localiser from the slice labels alone (multiple-instance "
        "learning, section mil) and offer its maps to the search as one more member; the "
        "paper configs turn it off",
    )
    mil_variants: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "mil": {},
            "mil_symmetric": {"negative_top": True, "scale_quantile": 0.999},
            "mil_dae": {
                "objective": "denoise",
                "lr": 0.002,
                "scheduler": "cosine",
                "channels": [16, 32, 64, 128],
                "strides": [2, 2, 2],
                "num_res_units": 0,
                "scale_quantile": 0.999,
                "smooth_sigma": 1.0,
                "augment_prob": 0.0,
            },
        },
        min_length=1,
        description="localisers trained when run.mil is on: name -> the mil section's "
        "fields that this one changes; each is one more member (localiser__<name>), and the "
        "search keeps the one that localises (names: mil, then letters, digits or _). Only "
        "the first is trained when the calibration part has no masks: the slice-label "
        "criterion favours large masks and picks a collapsed localiser. "
        "mil_symmetric adds the symmetric MIL term with its maps scaled into the grid: on "
        "small lesions in organ windows (the kits phantom) the plain localiser lights the "
        "whole organ, on the brats phantom the symmetric one collapses. mil_dae is a denoising "
        "autoencoder of healthy appearance (objective denoise; deeper, mirrored slices "
        "only): its residual finds lesions that look unlike healthy tissue but that no "
        "MIL localiser marks (the kits phantom's dark cysts); run.mil false trains none",
    )
    pseudo_search: bool = Field(
        True,
        description="choose the configuration behind the self-training labels by a search "
        "of its own (fold<k>/pseudo_search): lesion Dice on the calibration part's slices "
        "labelled lesion only, which is how the labels see it (every lesion-free training "
        "slice is background whatever the maps say), so a member that also lights healthy "
        "slices is judged on what it adds where the lesions are; off, or without masks in "
        "the calibration part: the ensemble's configuration",
    )
    refine: bool = Field(
        True,
        description="refine the chosen ensemble's masks of the training part into "
        "three-class pseudo-labels (section refine) before self-training; off: the plain "
        "ensemble masks with the slice labels applied",
    )
    rounds: int = Field(
        2,
        ge=1,
        description="self-training rounds: each round after the first trains a new U-Net "
        "on the previous one's lesion probabilities (a single member at threshold 0.5) "
        "refined again like the ensemble's (section refine); the last round's U-Net is the "
        "self-trained row, and run.final auto may choose an earlier round's (default 2: "
        "the second round gained on two of the three phantom layouts; 1: one U-Net less)",
    )
    final: Literal["auto", "self_trained", "ensemble"] = Field(
        "auto",
        description="the final method (export/, predict): auto takes, of the chosen "
        "ensemble and each self-training round's U-Net, the one with the highest mean "
        "lesion Dice on the val part's masks over the folds (the last round's U-Net when "
        "the val part has no masks); self_trained: the last round's U-Net, needs "
        "run.pseudo_unet",
    )
    gate: Literal["none", "classifiers"] = Field(
        "classifiers",
        description="classifier gating of the self-trained U-Net's masks (evaluation, "
        "export/, predict): classifiers empties every slice whose mean classifier "
        "P(lesion) is below gate_threshold; none keeps the U-Net's masks as they are",
    )
    gate_threshold: float | Literal["auto"] = Field(
        "auto",
        description="gate: slices with mean classifier P(lesion) below this are emptied; "
        "auto calibrates it per U-Net on the val part's slice labels (0 or a value of "
        "search.gate_grid, by the slice F1 of the gated masks; 0 gates nothing)",
    )

    segmenter_threshold: float | Literal["auto"] = Field(
        "auto",
        description="the U-Nets' masks are P(lesion) > this (evaluation, export/, predict); "
        "auto calibrates it per U-Net on the masks of calibration_part, as the search does "
        "the ensemble's thresholds (the value of segmenter_grid with the highest lesion "
        "Dice there; 0.5, the argmax, without masks)",
    )
    segmenter_grid: str = Field(
        "0.05:0.95:0.05", description="segmenter_threshold auto: the thresholds tried"
    )

    @field_validator("gate_threshold", "segmenter_threshold", mode="before")
    @classmethod
    def _check_gate_threshold(cls, value: Any) -> Any:
        """A probability in [0, 1] (NaN refused), or auto."""
        if value == "auto":
            return value
        try:
            ok = not isinstance(value, bool) and 0.0 <= float(value) <= 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"must be auto or a probability in [0, 1], got {short_repr(value)}")
        return float(value)

    export: bool = Field(True, description="write the evaluated masks as NIfTI")
    export_maps: bool = Field(False, description="also export the first member's maps")
    report: bool = Field(True, description="write the HTML report")

    @field_validator("mil_variants")
    @classmethod
    def _check_variants(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Names as member folders need them; each change a valid mil field."""
        for name, changes in value.items():
            check_localiser_name(name)
            try:
                MilConfig.model_validate(changes)
            except ValidationError as exc:
                raise ValueError(_format_error(exc, name)) from None
        return value


class SpatialAugmentFields(Section):
    """The segmenters' training augmentation (U-Nets and MIL localisers;
    :class:`ensemblecam.training.data.EpochSpatial`): slices and their targets rotated,
    zoomed and mirrored together."""

    augment: Literal["none", "spatial"] = Field(
        "spatial",
        description="training augmentation: spatial = random rotation and zoom (with "
        "augment_prob) and mirroring of each in-plane axis, image and target alike; none: "
        "the slices as stored (the published protocols' configs)",
    )
    augment_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="spatial: probability of rotating and zooming a slice"
    )
    rotate_deg: float = Field(15.0, ge=0.0, le=180.0, description="spatial: largest rotation")
    zoom: float = Field(0.1, ge=0.0, lt=1.0, description="spatial: zoom factor in 1 +- zoom")
    flip: bool = Field(True, description="spatial: mirror each in-plane axis with p = 1/2")


class UNetConfig(SpatialAugmentFields, DeviceConfig):
    """Supervised 2-D U-Net (MONAI) on a fold's training part: the fully supervised upper
    bound (store masks) or the second stage on the ensemble's pseudo-labels (masks.npz)."""

    channels: list[int] = Field([16, 32, 64, 128], description="feature maps per level")
    strides: list[int] = Field([2, 2, 2], description="down-sampling per level (levels - 1)")
    num_res_units: int = Field(2, ge=0, description="residual units per block")
    norm: Literal["instance", "batch"] = Field("instance", description="normalisation layer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability")
    out_channels: Literal[1, 2] = Field(2, description="2: softmax + argmax, 1: sigmoid > 0.5")
    epochs: int = Field(30, ge=1, description="training epochs")
    batch_size: int = Field(16, ge=1, description="batch size per device")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")
    lambda_dice: float = Field(1.0, ge=0, description="weight of the Dice loss")
    lambda_ce: float = Field(1.0, ge=0, description="weight of the cross-entropy loss")
    val_targets: Literal["same", "store", "none"] = Field(
        "same", description="validation masks: same source as training, store ground truth, none"
    )
    oversample: float = Field(
        0.33,
        ge=0.0,
        lt=1.0,
        description="least share of training samples drawn from slices whose target has "
        "lesion pixels (nnU-Net's foreground oversampling, 0.33); 0: plain shuffling",
    )
    boundary_ignore: int = Field(
        1,
        ge=0,
        description="pseudo-label targets only (never the store's masks): lesion pixels "
        "within this many pixels (4-connected) of the label's lesion border are left out "
        "of the loss, where the label is least certain; 0: every pixel counts",
    )
    seed: int = Field(0, description="seed of initialisation and data order")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")


#: a MIL localiser of ``run`` trains this many times the segmenter's epochs (``mil.epochs``
#: unset): on the kits phantom its lesion Dice alone rises with its epochs (15, 30, 60:
#: 0.18, 0.32, 0.44 held out) while its val loss keeps falling
MIL_EPOCH_FACTOR = 4


class MilConfig(SpatialAugmentFields, DeviceConfig):
    """Localiser trained from slice labels alone: a shallow MONAI U-Net with the
    multiple-instance loss (:func:`ensemblecam.training.losses.mil_loss`): every pixel of a
    lesion-free slice is background, the ``top_fraction`` highest pixel scores of a lesion
    slice say lesion, its ``bottom_fraction`` lowest say background. Few levels keep the
    receptive field small, so the net must find the lesion instead of slice-wide cues.
    Its map (P(lesion) per pixel, smoothed) becomes the map-store member ``localiser__mil``."""

    objective: Literal["mil", "denoise"] = Field(
        "mil",
        description="mil: the multiple-instance loss on the slice labels (the map is "
        "P(lesion)); denoise: a denoising autoencoder of healthy appearance (Kascenas et al., "
        "MIDL 2022) trained on the lesion-free slices alone to remove coarse noise (noise_std, "
        "noise_grid); its map is the residual sum_c |x_c - f(x)_c|, high where the slice "
        "differs from what the model knows as healthy (needs scale_quantile)",
    )
    noise_std: float = Field(
        0.2, gt=0.0, description="denoise: standard deviation of the added noise"
    )
    noise_grid: int = Field(
        8,
        ge=1,
        description="denoise: the noise is drawn on a grid of (H / noise_grid, W / noise_grid) "
        "cells and upsampled bilinearly: coarse noise hides lesion-sized structure, so the "
        "model learns healthy appearance rather than a pixel-wise filter",
    )
    channels: list[int] = Field([16, 32], description="feature maps per level (few: small field)")
    strides: list[int] = Field([2], description="down-sampling per level (levels - 1)")
    num_res_units: int = Field(1, ge=0, description="residual units per block")
    norm: Literal["instance", "batch"] = Field("instance", description="normalisation layer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability")
    epochs: int | None = Field(
        None,
        ge=1,
        description=f"training epochs (default: in run {MIL_EPOCH_FACTOR} x unet.epochs: the "
        "multiple-instance signal is weak and the localiser's val loss still falls long "
        "after the segmenter's budget; in the mil command 30)",
    )
    batch_size: int = Field(16, ge=1, description="batch size per device")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")
    scheduler: Literal["none", "cosine"] = Field(
        "none",
        description="learning-rate schedule: none (constant) or cosine (from lr to 0 over "
        "the epochs; run's mil_dae: the autoencoder's loss still falls at the end of a "
        "constant-rate budget)",
    )
    top_fraction: float = Field(
        0.01, gt=0.0, le=1.0, description="share of a lesion slice's pixels pushed to lesion"
    )
    bottom_fraction: float = Field(
        0.5, ge=0.0, lt=1.0, description="share of a lesion slice's pixels pushed to background"
    )
    negative_top: bool = Field(
        False,
        description="also push a lesion-free slice's top_fraction highest pixel scores to "
        "background (the symmetric MIL term; run's mil_symmetric localiser turns it on). On "
        "the kits phantom (small lesions in kidney windows) it stops the localiser lighting "
        "the whole kidney, on the brats phantom it makes the localiser collapse",
    )
    oversample: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="least share of training draws from lesion slices (0.5: balanced slice "
        "labels, so a rare lesion class does not shrink P(lesion) below the searched "
        "thresholds; useful with negative_top); 0: plain shuffling",
    )
    scale_quantile: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="divide the maps by this quantile of the training part's map values "
        "(e.g. 0.999; one constant, kept for predict), so that maps whose P(lesion) stays "
        "low span the searched thresholds (run's mil_symmetric localiser: 0.999); default: "
        "unscaled",
    )
    smooth_sigma: float | None = Field(
        None,
        ge=0.0,
        description="Gaussian smoothing of the map in pixels (default: prod(strides), the "
        "localiser's coarsest grid; top-k pooling alone marks only scattered pixels)",
    )
    seed: int = Field(0, description="seed of initialisation and data order")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")

    @model_validator(mode="after")
    def _check_denoise(self) -> MilConfig:
        """A residual map is unbounded: denoise needs the scale that maps it into [0, 1]."""
        if self.objective == "denoise" and self.scale_quantile is None:
            raise ValueError("objective denoise needs scale_quantile (e.g. 0.999)")
        return self

    def run_epochs(self, unet_epochs: int) -> int:
        """Epochs in ``run``: ``epochs``, else :data:`MIL_EPOCH_FACTOR` x the segmenter's."""
        return self.epochs or MIL_EPOCH_FACTOR * unet_epochs

    def sigma(self) -> float:
        """The smoothing actually used (``smooth_sigma`` or prod(strides))."""
        if self.smooth_sigma is not None:
            return float(self.smooth_sigma)
        return float(math.prod(self.strides)) if self.strides else 0.0


class RefineConfig(Section):
    """``ensemblecam refine``: three-class pseudo-labels (1 lesion, 0 background, 255 ignore)
    of a fold's training (and validation) part from the chosen ensemble, its searched
    thresholds and the slice labels (:mod:`ensemblecam.refine`). Each refiner in
    ``refiners`` is tried; the one whose pseudo-labels score the highest lesion Dice
    against the part's masks is kept (``criterion: masks``); without masks ``fallback``."""

    store: Path = Field(Path("store"), description="slice store")
    splits: Path | None = Field(None, description="split file (default <store>/splits.json)")
    fold: str = Field("0", description="fold position or name")
    parts: list[str] = Field(["train", "val"], description="split parts to label")
    maps: Path = Field(Path("maps"), description="map store root")
    config_file: Path = Field(
        Path("search/best.json"), description="chosen configuration (best.json of search)"
    )
    refiners: list[Literal["none", "crf", "random_walker"]] = Field(
        ["none", "crf", "random_walker"],
        description="candidates: none (the ensemble's seeds), crf (dense CRF on the image), "
        "random_walker (scikit-image)",
    )
    fallback: Literal["none", "crf", "random_walker"] = Field(
        "none", description="refiner used when the part has no masks to choose with"
    )
    margins: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        [0.0, 0.5],
        min_length=1,
        description="crf/random_walker seeds: relative score (0 at the searched threshold, "
        "+-1 at the map's ends) beyond +-margin; each margin gives each image refiner one "
        "candidate (the fallback takes the first)",
    )
    ignore: bool = Field(
        True,
        description="keep uncertain pixels (members disagree, CRF/random-walker band) as 255, "
        "left out of the self-training loss; off: they are background (measured, held-out "
        "lesion Dice of the self-trained U-Net, ignore vs off: msd phantom 0.65 vs 0.31 and "
        "0.69 vs 0.68 (two seeds), brats 0.54 vs 0.63: off is the riskier choice)",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description='further refine options, e.g. {"band": 0.1, "min_component": 0.2}',
    )
    round_options: dict[str, Any] = Field(
        default_factory=dict,
        description="refine options added in self-training rounds 2+, whose one member is "
        "the previous round's U-Net at 0.5; e.g. {\"uncertain_bg\": 0.8}: a lesion slice's "
        "background only where that U-Net's P(lesion) <= 0.1, the rest ignore (measured, "
        "held-out round 2: brats phantom 0.742 -> 0.764 and 0.727 -> 0.756 over two seeds, "
        "msd 0.867 -> 0.864, kits 0.705 -> 0.685: off by default)",
    )
    out: Path = Field(Path("refine"), description="output folder")

    def for_round(self, r: int) -> RefineConfig:
        """The refine section of self-training round ``r`` (1: this one; 2+: with
        ``round_options`` over ``options``)."""
        if r < 2 or not self.round_options:
            return self
        return self.model_copy(update={"options": {**self.options, **self.round_options}})


class Config(Section):
    """All stages' options; every section is optional in the YAML file."""

    synth: SynthConfig = SynthConfig()
    prepare: PrepareConfig = PrepareConfig()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    cam: CamConfig = CamConfig()
    run: RunConfig = RunConfig()
    unet: UNetConfig = UNetConfig()
    mil: MilConfig = MilConfig()
    refine: RefineConfig = RefineConfig()

    def localisers(self) -> dict[str, MilConfig]:
        """The run's MIL localisers (empty when ``run.mil`` is off): name -> the mil
        section with the variant's changes (``run.mil_variants``)."""
        if not self.run.mil:
            return {}
        base = self.mil.model_dump()
        return {
            name: MilConfig.model_validate({**base, **changes})
            for name, changes in self.run.mil_variants.items()
        }


MAX_YAML_BYTES = 2**20  #: largest config file read (1 MiB)
MAX_YAML_ALIASES = 100  #: most alias uses (``*name``) in one config
#: largest config once aliases are expanded: nodes + characters of scalars (4 Mi)
MAX_YAML_NODES = 4 * 2**20
MAX_SHOWN = 300  #: longest value (its repr) quoted in an error message

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_SHOWN
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 20
_REPR.maxlevel = 3


def short_repr(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters (``...`` marks a cut).

    Built with ``reprlib`` (long strings and containers abbreviated while written), so
    a huge value costs O(limit), not O(len(value)).
    """
    text = " ".join(_REPR.repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str, limit: int = 4 * MAX_SHOWN) -> str:
    """``text`` with line breaks folded into spaces, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key {short_repr(key)}"
    if err["type"] == "value_error":  # a validator's own message names the value
        return f"{source}: key {short_repr(key)}: {one_line(str(err['ctx']['error']))}"
    return (
        f"{source}: key {short_repr(key)}: {one_line(err['msg'], MAX_SHOWN)} "
        f"(got {short_repr(err.get('input'))})"
    )


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader counting alias uses (at most ``MAX_YAML_ALIASES``)."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.name = self.source = source  # shown in PyYAML's error marks
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise InputError(
                    f"{self.source}: more than {MAX_YAML_ALIASES} YAML aliases "
                    f"(*name); write the values out"
                )
        return super().compose_node(parent, index)


def _expanded_size(node: yaml.Node, source: str) -> int:
    """Size of ``node`` with every alias expanded: nodes + characters of scalars.

    Memoised per node, so linear in the composed (unexpanded) document.
    """
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # a recursive alias counts once here; the constructor refuses it
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        else:
            total += len(n.value)
        if total > MAX_YAML_NODES:
            raise InputError(
                f"{source}: YAML larger than {MAX_YAML_NODES:,} values and "
                f"characters once aliases are expanded; not a config"
            )
        sizes[key] = total
        return total

    return size(node)


def load_yaml_text(text: str, source: str) -> Any:
    """Parse YAML ``text`` with the safe loader and the alias/size limits above."""
    loader = _LimitedLoader(text, source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML ({one_line(str(exc))})") from exc
    except RecursionError as exc:
        raise InputError(f"{source}: YAML nested too deeply") from exc
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Read the YAML file at ``path`` (UTF-8, at most ``MAX_YAML_BYTES``); see load_yaml_text."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise InputError(
                f"{path}: config file of {size:,} bytes; at most "
                f"{MAX_YAML_BYTES:,} bytes (1 MiB) are read"
            )
        with open(path, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read config file ({exc.strerror})") from exc
    if len(raw) > MAX_YAML_BYTES:
        raise InputError(f"{path}: config file over {MAX_YAML_BYTES:,} bytes (1 MiB)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from exc
    return load_yaml_text(text, str(path))


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a YAML config; ``None`` gives the defaults. Bad files raise InputError."""
    if path is None:
        return Config()
    path = Path(path)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config must be a mapping of sections")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise InputError(_format_error(exc, str(path))) from exc
