"""What a result depends on besides its configuration: package versions, CPU kernels, threads.

Floating-point results of the same code and seed differ between machines when the
libraries pick other kernels: oneDNN (PyTorch's CPU convolutions) dispatches on the CPU's
instruction set (AVX2, AVX-512, AMX), and a different summation order changes the last
bits of every convolution, which a few epochs of training amplify. The same versions on
the same kind of CPU give byte-identical results. A run folder records all of it in
``run.json`` so that a difference can be traced, and the lock file
(``constraints.txt`` of a source checkout) pins the versions.
"""

from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

#: packages whose versions can change a result (recorded in run.json, compared on resume)
PACKAGES = ("torch", "monai", "numpy", "scipy", "nibabel", "lightning", "scikit-image",
            "pydantic", "ensemblecam")  # fmt: skip
LOCK_FILE = "constraints.txt"


def package_versions() -> dict[str, str | None]:
    """Installed version of every package in :data:`PACKAGES` (None if absent)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def lock_file() -> Path | None:
    """The lock file of the source checkout this package runs from (None for a wheel)."""
    path = Path(__file__).resolve().parents[2] / LOCK_FILE
    return path if path.is_file() else None


def lock_record() -> dict[str, Any]:
    """The lock file's sha256 and the packages whose installed version differs from it."""
    path = lock_file()
    if path is None:
        return {"file": None, "sha256": None, "differs": {}}
    text = path.read_text()
    pinned = {}
    for line in text.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not name.startswith("#"):
            pinned[name.lower().replace("_", "-")] = version
    differs = {}
    for name, have in package_versions().items():
        want = pinned.get(name)
        if want is not None and have is not None and have.split("+")[0] != want:
            differs[name] = {"installed": have, "locked": want}
    return {
        "file": str(path),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "differs": differs,
    }


def threads() -> dict[str, Any]:
    """Thread counts and the environment variables that set them."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }


def cpu_kernels() -> dict[str, Any]:
    """The instruction set PyTorch dispatches to, and the variables that cap it."""
    import torch

    return {
        "machine": platform.machine(),
        "model": _cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")},
    }


def _cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def environment_record() -> dict[str, Any]:
    """Everything above in one JSON-ready dict (the ``environment`` of run.json)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "lock": lock_record(),
        "threads": threads(),
        "cpu": cpu_kernels(),
    }


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``name old -> new`` for every package version (recorded in both) or CPU kernel set
    that differs between two :func:`environment_record` results."""
    out = []
    a_pkgs, b_pkgs = old.get("packages", {}), new.get("packages", {})
    for name in sorted(set(a_pkgs) & set(b_pkgs)):
        a, b = a_pkgs[name], b_pkgs[name]
        if a != b:
            out.append(f"{name} {a} -> {b}")
    a = old.get("cpu", {}).get("torch_cpu_capability")
    b = new.get("cpu", {}).get("torch_cpu_capability")
    if a is not None and a != b:
        out.append(f"CPU kernels {a} -> {b}")
    return out
