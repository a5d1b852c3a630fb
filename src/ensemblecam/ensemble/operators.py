"""Ensemble operators: the reference semantics, and a typed ensemble configuration.

A member's map m (dequantised to float32, :func:`ensemblecam.io.mapstore.dequantise`) is
binarised as ``m > t`` with t a float32 threshold.

- ``and`` / ``or``: intersection / union of the member masks; ``vote:k``: >= k of the
  members (``vote`` alone: majority, k = m//2 + 1); ``and`` = vote:m, ``or`` = vote:1.
- ``min`` (the paper's '<') / ``max`` ('>'): per slice, the member mask with the fewest /
  most positive pixels; ties go to the first member (in the order given).
- ``mean``: ``mean(maps) > t`` with mean = (m_1 + ... + m_M) / M in float32, summed in
  member order; one threshold.
- ``single``: one member, one threshold.
- gating (optional): a slice whose classifier probability is below the gate g gets an
  empty mask; the probability is the MEAN of the members' probabilities (:func:`gate_probs`).

:func:`apply_config` is the reference: the search (:mod:`ensemblecam.ensemble.search`)
must agree with it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.mapstore import dequantise

BASE_OPERATORS = ("and", "or", "min", "max", "vote", "mean")
#: The keys of a configuration in best.json, ranking rows and metrics.json "config".
CONFIG_KEYS = ("operator", "members", "thresholds", "gate")


@dataclass(frozen=True)
class EnsembleConfig:
    """One ensemble configuration: ``operator`` (and|or|min|max|vote:k|mean|single),
    ``members`` (map-set names, in order), ``thresholds`` (one per member; one for mean),
    ``gate`` (None or a probability threshold). Values are kept as read (JSON numbers)."""

    operator: str
    members: tuple[str, ...]
    thresholds: tuple[float, ...]
    gate: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "") -> EnsembleConfig:
        """From a best.json / ranking row (other keys ignored); a missing key: InputError."""
        missing = [k for k in CONFIG_KEYS if k not in d]
        if missing:
            raise InputError(f"{source}: configuration lacks {', '.join(missing)}")
        return cls(d["operator"], tuple(d["members"]), tuple(d["thresholds"]), d["gate"])

    @classmethod
    def read(cls, path: str | Path, what: str = "configuration") -> EnsembleConfig:
        """The configuration in a JSON file (best.json: the best ranking row + settings)."""
        return cls.from_dict(fsutil.read_json(Path(path), what), str(path))

    def to_dict(self) -> dict[str, Any]:
        """{"operator", "members": [...], "thresholds": [...], "gate"}: best.json's keys."""
        return {
            "operator": self.operator,
            "members": list(self.members),
            "thresholds": list(self.thresholds),
            "gate": self.gate,
        }


def parse_operator(name: str, m: int) -> tuple[str, int]:
    """Operator name -> (kind, k). ``vote:k`` or ``vote`` (majority); unknown is an error."""
    base, _, arg = name.partition(":")
    if base not in BASE_OPERATORS or (arg and base != "vote"):
        raise InputError(
            f"operator {name!r}: expected one of {', '.join(BASE_OPERATORS)} (vote:k for k of M)"
        )
    if base == "vote":
        try:
            k = int(arg) if arg else m // 2 + 1
        except ValueError as exc:
            raise InputError(f"operator {name!r}: k must be an integer") from exc
        if not 1 <= k <= m:
            raise InputError(f"operator {name!r}: k must be within 1..{m}")
        return "vote", k
    return base, m if base == "and" else 1


def mean_map(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of dequantised maps in float32, summed in member order then divided by M."""
    acc = dequantise(np.asarray(maps[0])).copy()
    for m in maps[1:]:
        acc += dequantise(np.asarray(m))
    return acc / np.float32(len(maps))


def gate_probs(probs: Sequence[np.ndarray]) -> np.ndarray:
    """Gating probability of a configuration: mean of its members' probabilities."""
    return np.mean(np.stack([np.asarray(p, np.float64) for p in probs]), axis=0)


def apply_config(
    maps: Sequence[np.ndarray],
    config: EnsembleConfig | Mapping[str, Any],
    probs: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Binary masks (S, H, W) of the configuration on the members' maps (in config order).

    ``config``: an :class:`EnsembleConfig` or a mapping with "operator", "thresholds" and
    optionally "gate". ``m_i = dequantise(map_i) > float32(t_i)``; min/max pick per slice
    the member mask with fewest/most positives, ties to the first; gating empties slices
    with mean member probability < g.
    """
    if isinstance(config, EnsembleConfig):
        op, thresholds, gate = config.operator, config.thresholds, config.gate
    else:
        op, thresholds, gate = config["operator"], config["thresholds"], config.get("gate")
    thr = [np.float32(t) for t in thresholds]
    m = len(maps)
    if op == "mean":
        if len(thr) != 1:
            raise InputError(f"operator mean takes one threshold, got {len(thr)}")
        out = mean_map(maps) > thr[0]
    else:
        if op == "single":
            kind, k = "vote", 1
            if m != 1:
                raise InputError(f"operator single takes one member, got {m}")
        else:
            kind, k = parse_operator(op, m)
        if len(thr) != m:
            raise InputError(f"configuration has {m} members but {len(thr)} thresholds")
        bins = [dequantise(np.asarray(mp)) > t for mp, t in zip(maps, thr, strict=True)]
        out = _pick(bins, kind) if kind in ("min", "max") else np.sum(np.stack(bins), 0) >= k
    if gate is not None:
        if probs is None:
            raise InputError("configuration uses a gate but no classifier probabilities given")
        out[gate_probs(probs) < gate] = False
    return out


def _pick(bins: Sequence[np.ndarray], kind: str) -> np.ndarray:
    """min/max: per slice the member mask with the fewest/most positives (ties: first)."""
    out = bins[0].copy()
    best = bins[0].sum(axis=(1, 2))
    for b in bins[1:]:
        pos = b.sum(axis=(1, 2))
        better = pos < best if kind == "min" else pos > best
        out[better] = b[better]
        best = np.where(better, pos, best)
    return out
