"""Procedural phantom data sets written in the exact on-disk layout of real ones.

Three layouts, so the same loaders serve real and built-in data:

- ``brats`` (BraTS 2020): ``<root>/BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}
  .nii.gz`` plus ``name_mapping.csv``; seg labels 0, 1 necrotic/non-enhancing core, 2 oedema,
  4 enhancing rim. Stored LPS (affine ``diag(-1, -1, 1)``, 1 mm) as BraTS is.
- ``msd`` (Decathlon Task05_Prostate): ``imagesTr/prostate_NN.nii.gz`` 4-D (x, y, z, 2) with
  channel 0 = T2 and 1 = ADC, ``labelsTr/prostate_NN.nii.gz`` (1 PZ, 2 TZ), ``dataset.json``.
- ``kits`` (KiTS21): ``case_NNNNN/imaging.nii.gz`` (int16 Hounsfield units) and
  ``segmentation.nii.gz`` (1 kidney, 2 tumour, 3 cyst), ``kits.json``; stored slice-first with
  the KiTS21 orientation (axis codes I, P, L), so loaders must reorient to RAS+.

Every generator builds its volume in RAS+ canonical voxel order ``(x, y, z)`` (``--shape``)
and the writer converts it to the layout's stored orientation with nibabel's orientation
tools, adjusting the affine, so ``nib.as_closest_canonical`` gives the generated array back.
A ``phantom.json`` in the root records the generator settings and per-case facts (lesion
voxels, confounder positions); real-data loaders ignore it.

Randomness: case ``i`` uses ``numpy.random.default_rng(SeedSequence([seed, i]))``, and the
lesion-free cases are drawn from ``seed`` alone, so the data do not depend on ``workers``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage as ndi

from ensemblecam import progress as progress_out
from ensemblecam.config import SynthConfig
from ensemblecam.errors import InputError
from ensemblecam.io.fsutil import commit_output_dir, prepare_output_dir, write_json, write_text

GENERATOR_VERSION = "1"
PHANTOM_FILE = "phantom.json"
MIN_INPLANE = 32
MIN_SLICES = 8

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
BRATS_LABELS = (0, 1, 2, 4)
MSD_LABELS = (0, 1, 2)
KITS_LABELS = (0, 1, 2, 3)

# Stored orientation and voxel size (mm) per layout.
_AXCODES = {"brats": ("L", "P", "S"), "msd": ("R", "A", "S"), "kits": ("I", "P", "L")}
_SPACING = {"brats": (1.0, 1.0, 1.0), "msd": (0.8, 0.8, 3.0), "kits": (1.5, 1.5, 2.5)}

Array = np.ndarray
F32 = np.float32


# --------------------------------------------------------------------------- helpers


def smooth_noise(shape: tuple[int, ...], scale: float, rng: np.random.Generator) -> Array:
    """Zero-mean, unit-std Gaussian random field with correlation length ~``scale`` voxels.

    White noise on a grid of spacing ``scale/2``, Gaussian-smoothed (sigma 2 cells) and
    linearly upsampled to ``shape``: cost independent of ``scale``.
    """
    cell = max(scale / 2.0, 1.0)
    coarse = tuple(int(np.ceil(s / cell)) + 4 for s in shape)
    field = ndi.gaussian_filter(rng.standard_normal(coarse).astype(F32), 2.0, mode="wrap")
    if coarse != shape:
        factors = [s / c for s, c in zip(shape, coarse, strict=True)]
        field = ndi.zoom(field, factors, order=1, mode="nearest")
    field = field[tuple(slice(0, s) for s in shape)]
    field -= field.mean()
    return field / (field.std() + 1e-8)


def _sigmoid_edge(signed: Array, width: float) -> Array:
    """Soft inside-membership: 1/(1+exp(-signed/width)) (partial-volume edge)."""
    return (0.5 * (1.0 + np.tanh(signed / (2.0 * width)))).astype(F32)


def _grid(shape: tuple[int, int, int]) -> tuple[Array, Array, Array]:
    """Normalised voxel coordinates in [-1, 1] per axis (broadcastable ogrid, float32)."""
    return tuple(  # type: ignore[return-value]
        ((np.arange(n, dtype=F32) - (n - 1) / 2.0) / (n / 2.0)).reshape(
            [-1 if a == i else 1 for a in range(3)]
        )
        for i, n in enumerate(shape)
    )


def _warped_grid(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.06),
    rot_deg: float = 8.0,
    shift: float = 0.04,
    deform: float = 0.035,
) -> tuple[Array, Array, Array]:
    """Per-case anatomy coordinates: p' = R^-1 (p - t) / s + d(p).

    Random per-axis scale s, in-plane rotation R, shift t and a smooth random
    displacement d (amplitude ``deform`` in normalised units).
    """
    x, y, z = _grid(shape)
    s = rng.uniform(*scale, size=3).astype(F32)
    t = rng.uniform(-shift, shift, size=3).astype(F32)
    a = np.deg2rad(rng.uniform(-rot_deg, rot_deg))
    c, si = F32(np.cos(a)), F32(np.sin(a))
    xs, ys = x - t[0], y - t[1]
    xr = (c * xs + si * ys) / s[0]
    yr = (-si * xs + c * ys) / s[1]
    zr = np.broadcast_to((z - t[2]) / s[2], shape)
    corr = max(shape[0], shape[1]) / 5.0
    return (
        xr + deform * smooth_noise(shape, corr, rng),
        yr + deform * smooth_noise(shape, corr, rng),
        zr + deform * smooth_noise(shape, corr, rng),
    )


def _rician(image: Array, sigma: float, rng: np.random.Generator) -> Array:
    """Magnitude-image noise: |image + n1 + i n2|, n ~ N(0, sigma^2)."""
    n1 = rng.standard_normal(image.shape, dtype=F32) * F32(sigma)
    n2 = rng.standard_normal(image.shape, dtype=F32) * F32(sigma)
    return np.sqrt((image + n1) ** 2 + n2**2)


def _lerp(base: Array, value: float, weight: Array) -> Array:
    """Paint ``value`` over ``base`` with soft ``weight``: base + w (value - base)."""
    return base + weight * (F32(value) - base)


def _check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3:
        raise InputError(f"shape {shape}: need three sizes x,y,z")
    if min(shape[:2]) < MIN_INPLANE or shape[2] < MIN_SLICES:
        raise InputError(
            f"shape {','.join(map(str, shape))}: too small "
            f"(need x,y >= {MIN_INPLANE} and z >= {MIN_SLICES})"
        )
    return shape


# --------------------------------------------------------------------------- brats

# Tissue intensities per modality (relative, WM on T1 ~ 0.8), order t1, t1ce, t2, flair.
_BRATS_TISSUE: dict[str, tuple[float, float, float, float]] = {
    "scalp": (0.85, 0.85, 0.50, 0.45),
    "skull": (0.08, 0.08, 0.06, 0.05),
    "csf": (0.15, 0.15, 0.95, 0.08),
    "gm": (0.55, 0.57, 0.52, 0.55),
    "wm": (0.80, 0.80, 0.34, 0.40),
    "oedema": (0.58, 0.60, 0.80, 0.92),
    "rim": (0.62, 1.20, 0.62, 0.78),
    "core": (0.28, 0.30, 0.88, 0.55),
    "spot": (0.70, 0.78, 0.85, 0.90),
}


def _brats_tumour(
    xyz: tuple[Array, Array, Array],
    brain_r: Array,
    rng: np.random.Generator,
    shape: tuple[int, int, int],
) -> dict[str, Any]:
    """One tumour: soft weights of core / rim / oedema and its centre and outer radius.

    Level set L = |(p - c) / R| (1 + 0.3 n(p)) with smooth noise n; core L < a_c,
    rim a_c <= L < a_r, oedema L' < a_o (L' with its own noise), all normalised units.
    """
    x, y, z = xyz
    # Size: log-uniform enhancing radius; some tumours are small (< 1% of a slice).
    r = float(np.exp(rng.uniform(np.log(0.05), np.log(0.26))))
    radii = (r * rng.uniform(0.75, 1.25, size=3)).astype(F32)
    oed = float(rng.uniform(1.4, 2.3))
    for _ in range(50):
        c = rng.uniform([-0.6, -0.65, -0.45], [0.6, 0.6, 0.55]).astype(F32)
        if abs(c[0]) > 0.12 and (c[0] / 0.62) ** 2 + (c[1] / 0.72) ** 2 + (c[2] / 0.7) ** 2 < 1:
            break
    d = np.sqrt(
        ((x - c[0]) / radii[0]) ** 2 + ((y - c[1]) / radii[1]) ** 2 + ((z - c[2]) / radii[2]) ** 2
    )
    corr = max(2.0, r * shape[0] / 2.0 * 0.8)
    level = d * (1.0 + 0.3 * smooth_noise(shape, corr, rng))
    level_o = d * (1.0 + 0.35 * smooth_noise(shape, corr * 1.5, rng))
    kind = rng.uniform()
    if kind < 0.25:  # non-enhancing (low-grade-like): core only, no rim
        a_core, a_rim = float(rng.uniform(0.8, 1.0)), 0.0
    else:
        a_core = float(rng.uniform(0.35, 0.6)) if r > 0.08 else 0.0
        a_rim = 1.0
    w = 0.04
    core = _sigmoid_edge(a_core - level, w) if a_core > 0 else np.zeros(shape, F32)
    tumour = _sigmoid_edge(max(a_rim, a_core) - level, w)
    rim = np.clip(tumour - core, 0, 1) if a_rim > 0 else np.zeros(shape, F32)
    oedema = _sigmoid_edge(oed - level_o, 0.06)
    return {
        "core": core,
        "rim": rim,
        "tumour": tumour,
        "oedema": np.maximum(oedema, tumour),
        "centre": c,
        "outer": float(oed * radii.max() * 1.35),
        "non_enhancing": a_rim == 0.0,
    }


def make_brats_case(
    shape: tuple[int, int, int], rng: np.random.Generator, lesion: bool = True
) -> dict[str, Any]:
    """One BraTS-like case in RAS+ voxel order.

    Returns ``t1``, ``t1ce``, ``t2``, ``flair`` (float32, ~[0, 1.3]), ``seg`` (uint8 labels
    0/1/2/4) and ``confounders`` (int array (k, 3) of voxel centres of bright non-tumour
    FLAIR/T2 spots). Head = scalp, skull, CSF, cortex (GM with folded GM/WM border), WM,
    deep GM, ventricles and falx; smooth bias field per modality and Rician noise.
    """
    shape = _check_shape(shape)
    x, y, z = _warped_grid(shape, rng)
    w = F32(1.0 / max(shape[0], shape[1]))  # ~1 voxel edge in normalised units
    zc = z + F32(0.12)
    head_r = np.sqrt((x / 0.80) ** 2 + (y / 0.92) ** 2 + (zc / 1.05) ** 2)
    fold = smooth_noise(shape, max(shape) / 14.0, rng)
    m_head = _sigmoid_edge(1.0 - head_r, w)
    m_skull = _sigmoid_edge(0.945 - head_r, w)
    m_csf = _sigmoid_edge(0.885 - head_r, w)
    m_brain = _sigmoid_edge(0.86 - head_r + 0.012 * fold, w)
    wm_level = 0.72 + 0.05 * fold - 0.12 * np.clip(-zc - 0.5, 0, None)
    m_wm = _sigmoid_edge(wm_level - head_r, 1.5 * w)
    # deep grey nuclei and lateral ventricles (variable size)
    deep_r = np.sqrt(
        ((np.abs(x) - 0.2) / 0.11) ** 2 + ((y + 0.02) / 0.16) ** 2 + ((zc - 0.05) / 0.16) ** 2
    )
    m_deep = _sigmoid_edge(1.0 - deep_r, 0.1)
    vs = F32(rng.uniform(0.7, 1.4))
    vent_r = np.sqrt(
        ((np.abs(x) - 0.09) / (0.06 * vs)) ** 2
        + ((y - 0.05) / 0.33) ** 2
        + ((zc - 0.22) / (0.12 * vs)) ** 2
    )
    m_vent = _sigmoid_edge(1.0 - vent_r, 0.08)
    m_falx = _sigmoid_edge(0.012 - np.abs(x), w) * _sigmoid_edge(zc, 0.05) * m_brain

    brain_hard = (m_brain > 0.5) & (m_vent < 0.5)
    seg = np.zeros(shape, np.uint8)
    layers: list[tuple[str, Array]] = []
    tumours: list[dict[str, Any]] = []
    if lesion:
        n_t = 1 + int(rng.uniform() < 0.15)
        for _ in range(n_t):
            t = _brats_tumour((x, y, z), head_r, rng, shape)
            tumours.append(t)
            # oedema spreads mostly in white matter
            oed = t["oedema"] * np.maximum(m_wm, 0.35 + 0.65 * t["tumour"]) * m_brain
            seg[(oed > 0.5) & brain_hard & (seg == 0)] = 2
            seg[(t["tumour"] > 0.5) & (m_brain > 0.5)] = 4
            seg[(t["core"] > 0.5) & (m_brain > 0.5)] = 1
            if t["non_enhancing"]:
                seg[(t["tumour"] > 0.5) & (m_brain > 0.5)] = 1
                layers += [("oedema", oed), ("core", t["tumour"] * m_brain)]
            else:
                layers += [
                    ("oedema", oed),
                    ("rim", t["rim"] * m_brain),
                    ("core", t["core"] * m_brain),
                ]

    # confounders: small bright FLAIR/T2 spots in white matter, away from tumours
    n_spots = int(rng.integers(2, 6))
    spot_w = np.zeros(shape, F32)
    centres: list[list[int]] = []
    tries = 0
    while len(centres) < n_spots and tries < 200:
        tries += 1
        c = rng.uniform([-0.55, -0.6, -0.3], [0.55, 0.55, 0.5])
        if (c[0] / 0.6) ** 2 + (c[1] / 0.7) ** 2 + ((c[2] + 0.12) / 0.75) ** 2 > 1:
            continue
        if any(np.linalg.norm(c - t["centre"]) < t["outer"] + 0.12 for t in tumours):
            continue
        rad = rng.uniform(0.022, 0.04)
        d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + ((z - c[2]) * 0.8) ** 2
        spot = np.exp(-d2 / (2 * rad**2)).astype(F32)
        peak = np.unravel_index(int(np.argmax(spot)), shape)
        if spot[peak] < 0.8 or seg[peak] != 0 or m_brain[peak] < 0.9 or m_vent[peak] > 0.1:
            continue
        spot_w = np.maximum(spot_w, spot)
        centres.append([int(v) for v in peak])
    m_spot = np.clip(1.6 * spot_w, 0, 1) * m_brain

    tissue = _BRATS_TISSUE
    texture = ndi.gaussian_filter(rng.standard_normal(shape, dtype=F32), 1.0)
    texture /= texture.std() + 1e-8
    out: dict[str, Any] = {}
    for k, mod in enumerate(BRATS_MODALITIES):
        img = m_head * F32(tissue["scalp"][k])
        img = _lerp(img, tissue["skull"][k], m_skull)
        img = _lerp(img, tissue["csf"][k], m_csf)
        img = _lerp(img, tissue["gm"][k], m_brain)
        img = _lerp(img, tissue["wm"][k], m_wm * m_brain)
        img = _lerp(img, tissue["gm"][k], m_deep * m_brain)
        img = _lerp(img, tissue["csf"][k], np.maximum(m_vent, m_falx) * m_brain)
        img = _lerp(img, tissue["spot"][k], m_spot)
        for name, wgt in layers:
            img = _lerp(img, tissue[name][k], wgt)
        img = img * (1.0 + 0.06 * texture) * m_head + img * (1 - m_head)
        bias = np.exp(0.12 * smooth_noise(shape, max(shape) / 1.5, rng))
        out[mod] = _rician(img * bias, 0.022, rng).astype(F32)
    out["seg"] = seg
    out["confounders"] = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
    return out


# --------------------------------------------------------------------------- msd prostate


def make_msd_case(
    shape: tuple[int, int, int], rng: np.random.Generator, lesion: bool = True
) -> dict[str, Array]:
    """One prostate MRI case in RAS+ voxel order: ``image`` (x, y, z, 2) float32 with
    channel 0 = T2 and 1 = ADC, and ``label`` uint8 (1 PZ, 2 TZ).

    Pelvis = elliptical body with fat rim, muscle, bladder (anterior), rectum (posterior);
    the prostate spans only the central ~40% of slices; PZ (posterior crescent) is bright
    on T2 and has high ADC, TZ (central) is darker on T2 and lower on ADC. The target
    (PZ + TZ, merged into one lesion class by the prostate protocol) exists only with
    ``lesion``: without it the case is a pelvis without a gland, so that
    ``tumour_free_fraction`` gives target-free cases in this layout as in the others.
    """
    shape = _check_shape(shape)
    x, y, z = _warped_grid(shape, rng, scale=(0.92, 1.08), rot_deg=5.0, deform=0.03)
    w = F32(1.0 / max(shape[0], shape[1]))
    body_r = np.sqrt((x / 0.92) ** 2 + (y / 0.72) ** 2)
    m_body = _sigmoid_edge(1.0 - body_r, w)
    m_muscle = _sigmoid_edge(0.88 - body_r, w)
    bl = np.sqrt((x / 0.3) ** 2 + ((y - 0.35) / 0.22) ** 2 + ((z - 0.35) / 0.5) ** 2)
    m_bladder = _sigmoid_edge(1.0 - bl, 0.05)
    re = np.sqrt((x / 0.12) ** 2 + ((y + 0.42) / 0.1) ** 2)
    m_rectum = _sigmoid_edge(1.0 - re, 0.08)
    size = F32(rng.uniform(0.8, 1.25))
    pz_c = F32(rng.uniform(-0.05, 0.05))
    zext = F32(0.45 * size)
    pr = np.sqrt(
        (x / (0.24 * size)) ** 2 + ((y + 0.12) / (0.18 * size)) ** 2 + ((z - pz_c) / zext) ** 2
    )
    lob = smooth_noise(shape, max(shape) / 8.0, rng)
    m_prost = _sigmoid_edge(1.0 - pr + 0.05 * lob, 0.04) * F32(lesion)
    tz = np.sqrt(
        (x / (0.15 * size)) ** 2
        + ((y + 0.06) / (0.11 * size)) ** 2
        + ((z - pz_c) / (zext * 0.8)) ** 2
    )
    m_tz = _sigmoid_edge(1.0 - tz + 0.05 * lob, 0.05) * m_prost
    label = np.zeros(shape, np.uint8)
    label[m_prost > 0.5] = 1
    label[(m_tz > 0.5) & (m_prost > 0.5)] = 2
    # (T2, ADC) per tissue
    vals = {
        "fat": (0.9, 0.2),
        "muscle": (0.3, 0.45),
        "bladder": (1.0, 1.0),
        "rectum": (0.25, 0.3),
        "pz": (0.75, 0.8),
        "tz": (0.42, 0.52),
    }
    texture = ndi.gaussian_filter(rng.standard_normal(shape, dtype=F32), 1.0)
    texture /= texture.std() + 1e-8
    chans = []
    for k in range(2):
        img = m_body * F32(vals["fat"][k])
        img = _lerp(img, vals["muscle"][k], m_muscle)
        img = _lerp(img, vals["bladder"][k], m_bladder * m_muscle)
        img = _lerp(img, vals["rectum"][k], m_rectum * m_muscle)
        img = _lerp(img, vals["pz"][k], m_prost)
        img = _lerp(img, vals["tz"][k], m_tz)
        img = img * (1 + 0.05 * texture)
        bias = np.exp(0.1 * smooth_noise(shape, max(shape) / 1.5, rng))
        img = _rician(img * bias, 0.03 if k == 0 else 0.05, rng)
        chans.append(img * (1000.0 if k == 0 else 2500.0))
    return {"image": np.stack(chans, axis=-1).astype(F32), "label": label}


# --------------------------------------------------------------------------- kits


def make_kits_case(
    shape: tuple[int, int, int], rng: np.random.Generator, lesion: bool = True
) -> dict[str, Array]:
    """One abdominal CT case in RAS+ voxel order: ``imaging`` int16 HU, ``segmentation``
    uint8 (1 kidney, 2 tumour, 3 cyst).

    Air -1000, subcutaneous fat -100, soft tissue 40, liver 60 (patient's right, +x),
    contrast-enhanced kidneys 150-190 left and right of the spine (bone 700, marrow 250),
    aorta 200; with ``lesion`` a tumour (~90 HU, heterogeneous) and/or a cyst (~10 HU) on
    one or both kidneys. Gaussian noise ~12 HU.
    """
    shape = _check_shape(shape)
    x, y, z = _warped_grid(shape, rng, scale=(0.94, 1.06), rot_deg=4.0, deform=0.025)
    w = F32(1.0 / max(shape[0], shape[1]))
    body_r = np.sqrt((x / 0.9) ** 2 + ((y - 0.05) / 0.68) ** 2)
    m_body = _sigmoid_edge(1.0 - body_r, w)
    m_inner = _sigmoid_edge(0.85 - body_r + 0.03 * smooth_noise(shape, 10, rng), w)
    vert = np.sqrt((x / 0.1) ** 2 + ((y + 0.38) / 0.1) ** 2)
    m_bone = _sigmoid_edge(1.0 - vert, 0.06)
    m_marrow = _sigmoid_edge(0.7 - vert, 0.06)
    m_aorta = _sigmoid_edge(1.0 - np.sqrt((x + 0.05) ** 2 + (y + 0.18) ** 2) / 0.06, 0.08)
    m_liver = _sigmoid_edge(
        1.0 - np.sqrt(((x - 0.45) / 0.4) ** 2 + ((y - 0.05) / 0.45) ** 2 + ((z - 0.75) / 0.7) ** 2),
        0.03,
    )
    seg = np.zeros(shape, np.uint8)
    hu = np.where(m_body > 0.5, F32(-100), F32(-1000)).astype(F32)
    hu = _lerp(np.full(shape, -1000, F32), -100, m_body)
    hu = _lerp(hu, 40, m_inner)
    hu = _lerp(hu, 60, m_liver * m_inner)
    hu = _lerp(hu, 700, m_bone)
    hu = _lerp(hu, 250, m_marrow)
    hu = _lerp(hu, 200, m_aorta)
    lesion_sides = set()
    if lesion:
        lesion_sides = {0, 1} if rng.uniform() < 0.15 else {int(rng.integers(0, 2))}
    for side, sx in enumerate((-1.0, 1.0)):
        cx = F32(sx * rng.uniform(0.3, 0.38))
        cy, cz = F32(rng.uniform(-0.3, -0.2)), F32(rng.uniform(-0.15, 0.15) + 0.05 * sx)
        ax = rng.uniform(0.9, 1.1) * np.array([0.13, 0.1, 0.42], F32)
        kr = np.sqrt(((x - cx) / ax[0]) ** 2 + ((y - cy) / ax[1]) ** 2 + ((z - cz) / ax[2]) ** 2)
        m_k = _sigmoid_edge(1.0 - kr, 0.05)
        m_med = _sigmoid_edge(0.55 - kr, 0.05)
        seg[m_k > 0.5] = 1
        hu = _lerp(hu, float(rng.uniform(160, 190)), m_k)
        hu = _lerp(hu, float(rng.uniform(110, 130)), m_med)
        if side not in lesion_sides:
            continue
        kinds = (
            ["tumour", "cyst"]
            if rng.uniform() < 0.25
            else ["tumour" if rng.uniform() < 0.7 else "cyst"]
        )
        for kind in kinds:
            # lesion centred on the kidney surface at a random angle and height
            ang = rng.uniform(0, 2 * np.pi)
            lc = (
                cx + ax[0] * 0.9 * np.cos(ang),
                cy + ax[1] * 0.9 * np.sin(ang),
                cz + rng.uniform(-0.6, 0.6) * ax[2],
            )
            lr = float(np.exp(rng.uniform(np.log(0.04), np.log(0.14))))
            d = np.sqrt((x - lc[0]) ** 2 + (y - lc[1]) ** 2 + (z - lc[2]) ** 2) / lr
            if kind == "tumour":
                d = d * (1 + 0.2 * smooth_noise(shape, 6, rng))
                m_l = _sigmoid_edge(1.0 - d, 0.06)
                het = smooth_noise(shape, 3, rng)
                hu = hu + m_l * (F32(90) + 25 * het - hu)
                seg[m_l > 0.5] = 2
            else:
                m_l = _sigmoid_edge(1.0 - d, 0.03)
                hu = _lerp(hu, 10, m_l)
                seg[m_l > 0.5] = 3
    hu = hu + rng.standard_normal(shape, dtype=F32) * F32(12) * (m_body > 0.1)
    return {"imaging": np.clip(np.round(hu), -1024, 3071).astype(np.int16), "segmentation": seg}


# --------------------------------------------------------------------------- writing


def case_names(layout: str, n_cases: int) -> list[str]:
    """Real-data case names: ``BraTS20_Training_001``, ``prostate_00``, ``case_00000``."""
    if layout == "brats":
        width = max(3, len(str(n_cases)))
        return [f"BraTS20_Training_{i + 1:0{width}d}" for i in range(n_cases)]
    if layout == "msd":
        width = max(2, len(str(n_cases - 1)))
        return [f"prostate_{i:0{width}d}" for i in range(n_cases)]
    if layout == "kits":
        return [f"case_{i:05d}" for i in range(n_cases)]
    raise InputError(f"layout {layout!r}: unknown (brats, msd, kits)")


def storage_affine(layout: str, shape: tuple[int, int, int]) -> tuple[Array, Array]:
    """(canonical RAS+ affine, orientation transform to the layout's stored axis codes)."""
    sp = np.asarray(_SPACING[layout], float)
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = -sp * (np.asarray(shape) - 1) / 2.0  # world origin at the volume centre
    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(_AXCODES[layout]))
    return aff, ornt


def to_stored(layout: str, arr: Array, shape: tuple[int, int, int]) -> tuple[Array, Array]:
    """Reorient a canonical (x, y, z[, c]) array to the layout's stored orientation.

    Returns (array, affine) with affine = A_ras @ inv_ornt_aff(T, shape), so that
    ``nib.as_closest_canonical`` restores the canonical array exactly.
    """
    aff, ornt = storage_affine(layout, shape)
    out = apply_orientation(arr, ornt)
    return np.ascontiguousarray(out), aff @ inv_ornt_aff(ornt, shape)


def _save(arr: Array, affine: Array, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.to_filename(str(path))


_GENERATORS: dict[str, Callable[..., dict[str, Any]]] = {
    "brats": make_brats_case,
    "msd": make_msd_case,
    "kits": make_kits_case,
}


def case_rng(seed: int, index: int) -> np.random.Generator:
    """Per-case generator from (seed, case index): independent of worker count."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, index]))


def lesion_free_cases(seed: int, n_cases: int, fraction: float) -> set[int]:
    """Indices of the round(fraction * n_cases) lesion-free cases, drawn from ``seed``."""
    n_free = round(fraction * n_cases)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 2**31 - 1]))
    return {int(i) for i in rng.permutation(n_cases)[:n_free]}


def write_case(
    layout: str,
    root: Path,
    name: str,
    index: int,
    seed: int,
    shape: tuple[int, int, int],
    lesion: bool,
) -> dict[str, Any]:
    """Generate case ``index`` and write its files under ``root``; return its summary."""
    data = _GENERATORS[layout](shape, case_rng(seed, index), lesion=lesion)
    info: dict[str, Any] = {"case": name}
    if layout == "brats":
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for mod in BRATS_MODALITIES:
            vol = np.clip(np.round(data[mod] * 1000.0), 0, 32767).astype(np.int16)
            arr, aff = to_stored(layout, vol, shape)
            _save(arr, aff, folder / f"{name}_{mod}.nii.gz")
        arr, aff = to_stored(layout, data["seg"], shape)
        _save(arr, aff, folder / f"{name}_seg.nii.gz")
        info["lesion_voxels"] = int((data["seg"] > 0).sum())
        info["confounders_ras_voxel"] = data["confounders"].tolist()
    elif layout == "msd":
        arr, aff = to_stored(layout, data["image"], shape)
        _save(arr, aff, root / "imagesTr" / f"{name}.nii.gz")
        arr, aff = to_stored(layout, data["label"], shape)
        _save(arr, aff, root / "labelsTr" / f"{name}.nii.gz")
        info["lesion_voxels"] = int((data["label"] > 0).sum())
    else:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        arr, aff = to_stored(layout, data["imaging"], shape)
        _save(arr, aff, folder / "imaging.nii.gz")
        arr, aff = to_stored(layout, data["segmentation"], shape)
        _save(arr, aff, folder / "segmentation.nii.gz")
        info["lesion_voxels"] = int(np.isin(data["segmentation"], (2, 3)).sum())
    return info


def _write_case_star(args: tuple[Any, ...]) -> dict[str, Any]:
    return write_case(*args)


def _brats_name_mapping(names: list[str], seed: int) -> str:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 2**31 - 2]))
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(
        [
            "Grade",
            "BraTS_2017_subject_ID",
            "BraTS_2018_subject_ID",
            "BraTS_2019_subject_ID",
            "BraTS_2020_subject_ID",
        ]
    )
    for n in names:
        wr.writerow(["HGG" if rng.uniform() < 0.76 else "LGG", "NA", "NA", "NA", n])
    return buf.getvalue()


def _msd_dataset_json(names: list[str]) -> dict[str, Any]:
    return {
        "name": "PROSTATE",
        "description": "Prostate transitional zone and peripheral zone segmentation "
        "(ensemblecam synthetic phantom)",
        "reference": "ensemblecam synth",
        "licence": "CC-BY-SA 4.0",
        "relase": "1.0 synthetic",
        "tensorImageSize": "4D",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": len(names),
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names
        ],
        "test": [],
    }


def same_phantom(cfg: SynthConfig) -> bool:
    """True if ``cfg.out`` holds a complete phantom that this generator version wrote with
    ``cfg``'s layout, case count, shape, seed and lesion-free share (its phantom.json)."""
    try:
        old = json.loads((Path(cfg.out) / PHANTOM_FILE).read_text())
    except (OSError, ValueError):
        return False
    new = {
        "version": GENERATOR_VERSION,
        "layout": cfg.layout,
        "n_cases": cfg.n_cases,
        "shape": list(_check_shape(tuple(cfg.shape))),  # type: ignore[arg-type]
        "seed": cfg.seed,
        "tumour_free_fraction": cfg.tumour_free_fraction,
    }
    return all(old.get(k) == v for k, v in new.items())


def synth_dataset(cfg: SynthConfig, force: bool = False) -> Path:
    """Write the phantom data set described by ``cfg`` to ``cfg.out``; return the path.

    Built in ``.<out>.partial`` and renamed when complete; an existing non-empty ``out``
    is refused unless ``force``. Cases run in ``cfg.workers`` processes.
    """
    shape = _check_shape(tuple(cfg.shape))  # type: ignore[arg-type]
    if cfg.n_cases < 1:
        raise InputError(f"n_cases {cfg.n_cases}: need at least 1")
    out = Path(cfg.out)
    names = case_names(cfg.layout, cfg.n_cases)
    partial = prepare_output_dir(out, force, PHANTOM_FILE)
    for child in partial.iterdir():  # stale leftovers of an interrupted run
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    if cfg.layout == "msd":
        (partial / "imagesTr").mkdir()
        (partial / "labelsTr").mkdir()
    free = lesion_free_cases(cfg.seed, cfg.n_cases, cfg.tumour_free_fraction)
    jobs = [
        (cfg.layout, partial, n, i, cfg.seed, shape, i not in free) for i, n in enumerate(names)
    ]
    workers = min(cfg.workers, len(jobs), os.cpu_count() or 1)
    bar = {"total": len(jobs), "desc": cfg.layout, "unit": "cases", "label": "synth"}
    if workers <= 1:
        infos = [write_case(*j) for j in progress_out.bar(jobs, **bar)]  # type: ignore[arg-type]
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            infos = list(progress_out.bar(ex.map(_write_case_star, jobs), **bar))  # type: ignore[arg-type]

    if cfg.layout == "brats":
        write_text(partial / "name_mapping.csv", _brats_name_mapping(names, cfg.seed))
    elif cfg.layout == "msd":
        write_json(partial / "dataset.json", _msd_dataset_json(names))
    else:
        write_json(
            partial / "kits.json",
            [
                {"case_id": n, "case_index": i, "malignant": bool(info["lesion_voxels"] > 0)}
                for i, (n, info) in enumerate(zip(names, infos, strict=True))
            ],
        )
    write_text(
        partial / PHANTOM_FILE,
        json.dumps(
            {
                "generator": "ensemblecam synth",
                "version": GENERATOR_VERSION,
                "layout": cfg.layout,
                "seed": cfg.seed,
                "shape": list(shape),
                "n_cases": cfg.n_cases,
                "tumour_free_fraction": cfg.tumour_free_fraction,
                "stored_axcodes": list(_AXCODES[cfg.layout]),
                "spacing_mm": list(_SPACING[cfg.layout]),
                "cases": [{**info, "lesion_free": i in free} for i, info in enumerate(infos)],
            },
            indent=1,
        )
        + "\n",
    )
    commit_output_dir(partial, out)
    return out
