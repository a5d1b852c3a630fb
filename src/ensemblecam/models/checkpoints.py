"""Weights files: pretrained-weight loading and ensemblecam checkpoints.

Pretrained weights come only from an explicit local file (:func:`load_pretrained`). The
head (the top-level module holding the last ``nn.Linear``) is re-initialised when its
shape does not fit; a checkpoint whose first convolution has k input channels is adapted
to a 1-channel model by summing its weights over the input channels,
``W1[o, 0] = sum_c Wk[o, c]`` (an image with equal channels x gives the same response).

A checkpoint (:func:`save_checkpoint`) is a ``torch.save`` dict
``{"format": "ensemblecam-checkpoint", "version": 1, "info": {...}, "state_dict": {...}}``
(+ ``"train_state"`` for resuming); ``info["model"]`` and ``info["model_args"]`` rebuild
the model with :func:`build_model` alone. Everything in it is a tensor or plain data
(dict, list, tuple, str, int, float, bool, None), so it loads with
``torch.load(weights_only=True)``; a file needing any other object is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.models.classifiers import build_model, first_conv, head_prefix

CHECKPOINT_FORMAT = "ensemblecam-checkpoint"
CHECKPOINT_VERSION = 1


def _clean_keys(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def safe_torch_load(path: Path, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, never code.

    A file that would need any other object (arbitrary unpickling, a possible code
    payload) is refused with one InputError line, and so is an unreadable file.
    """
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # an object other than tensors and plain data
            raise InputError(
                f"{path}: {what} refused: loading it would need unpickling arbitrary objects "
                "(only tensors and plain data are loaded)"
            ) from exc
        raise InputError(f"{path}: unreadable {what} ({_first_line(exc)})") from exc
    except Exception as exc:  # torch raises many types for a damaged file
        raise InputError(f"{path}: unreadable {what} ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0][:200] if lines else "") or type(exc).__name__


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    obj = safe_torch_load(path, "torch weights file")
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: holds no state dict of tensors")
    return _clean_keys(obj)


def load_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Load local weights into ``model`` (in place); return the re-initialised/adapted keys.

    Every non-head tensor must be present with the model's shape; the head is kept
    freshly initialised where it does not fit (another class count); a first conv with
    k input channels is summed over them for a 1-channel model. Anything else that does
    not fit raises one InputError line.
    """
    path = Path(path)
    src = _read_state_dict(path)
    target = model.state_dict()
    head = head_prefix(model)
    conv_name, conv = first_conv(model)
    conv_key = f"{conv_name}.weight"
    new: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    adapted: list[str] = []
    for key, want in target.items():
        in_head = bool(head) and key.startswith(head)
        if key not in src:
            if in_head:
                skipped.append(key)
                continue
            raise InputError(f"{path}: weights file does not fit the model: no tensor {key!r}")
        have = src[key]
        if key == conv_key and have.shape != want.shape and have.ndim == 4:
            if have.shape[1] != conv.in_channels and conv.in_channels == 1:
                have = have.sum(dim=1, keepdim=True)
                adapted.append(key)
            elif have.shape[1] != conv.in_channels:
                raise InputError(
                    f"{path}: first conv {key!r} takes {have.shape[1]} input channels, the "
                    f"store has {conv.in_channels} (only adaptation to 1 channel is supported)"
                )
        if have.shape != want.shape:
            if in_head:
                skipped.append(key)
                continue
            raise InputError(
                f"{path}: weights file does not fit the model: {key!r} has shape "
                f"{tuple(have.shape)}, model needs {tuple(want.shape)}"
            )
        new[key] = have.to(want.dtype)
    extra = [k for k in src if k not in target and not (head and k.startswith(head))]
    if extra:
        raise InputError(
            f"{path}: weights file does not fit the model: unexpected tensor {extra[0]!r}"
            f" (+{len(extra) - 1} more)"
        )
    model.load_state_dict(new, strict=False)
    return {"adapted": adapted, "reinitialised": skipped}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside Fabric/DDP/compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


#: per-epoch log columns that measure time, not the model (kept out of checkpoints' info)
WALL_CLOCK = ("images_per_s", "time_s")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    info: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> None:
    """Save ``model``'s weights with ``info`` (and optional resume state) atomically.

    Wall-clock figures (:data:`WALL_CLOCK` in ``info["metrics"]``) are left out, so the same
    seed and versions give byte-identical checkpoints; they stay in the training logs.
    """
    metrics = info.get("metrics")
    if isinstance(metrics, dict):
        info = {**info, "metrics": {k: v for k, v in metrics.items() if k not in WALL_CLOCK}}
    obj: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "info": info,
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
    }
    if train_state is not None:
        obj["train_state"] = train_state
    with fsutil.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict (info, state_dict, train_state if any); bad files -> InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    obj = safe_torch_load(path, "checkpoint", map_location)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not an ensemblecam checkpoint")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint version {obj.get('version')} is not supported")
    return obj


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint from its info alone; return (model in eval mode, info)."""
    obj = read_checkpoint(path, map_location)
    info = obj["info"]
    try:
        name, args = info["model"], dict(info["model_args"])
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path}: checkpoint info lacks model name/arguments") from exc
    model = build_model(name, **args)
    try:
        model.load_state_dict(_clean_keys(obj["state_dict"]))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise InputError(f"{path}: weights do not fit model {name!r} ({detail})") from exc
    model.to(map_location if isinstance(map_location, torch.device | str) else "cpu")
    return model.eval(), info
