"""Text of the report: numbers as the paper prints them, configurations in words."""

from __future__ import annotations

import math
from typing import Any


def _finite(value: Any) -> float | None:
    """``value`` as a finite float; None for missing, non-numeric, NaN or infinite values."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt_pct(mean: Any, std: Any = None) -> str:
    """'54.2 ± 0.8': a fraction (and its std) in percent with one decimal; '–' if undefined."""
    m, s = _finite(mean), _finite(std)
    if m is None:
        return "–"
    return f"{100 * m:.1f}" if s is None else f"{100 * m:.1f} ± {100 * s:.1f}"


def _fmt_num(mean: Any, std: Any = None) -> str:
    """'7.56 ± 1.2': a count or distance with 4 (std 3) significant digits; '–' if undefined."""
    m, s = _finite(mean), _finite(std)
    if m is None:
        return "–"
    out = f"{m:.4g}" if abs(m) < 1e4 else f"{m:.0f}"
    return out if s is None else f"{out} ± {s:.3g}"


def is_fraction_metric(name: str) -> bool:
    """Metrics shown as percentages (everything except counts and distances)."""
    return not (
        name.startswith("n_")
        or "hd95" in name
        or "undefined" in name
        or name in ("tp", "fp", "fn", "tn")
    )


def format_metric(name: str, mean: Any, std: Any = None) -> str:
    """'54.2 ± 0.8' for fractions (percent, one decimal as the paper), plain otherwise."""
    return fmt_pct(mean, std) if is_fraction_metric(name) else _fmt_num(mean, std)


def describe_config(cfg: dict[str, Any]) -> str:
    """'and: resnet18__layercam > 0.4, resnet34__gradcam > 0.3' (+ gate): each member's
    mask is map > threshold, combined by the operator."""
    pairs = [
        f"{m} > {float(t):g}"
        for m, t in zip(cfg.get("members", []), cfg.get("thresholds", []), strict=False)
    ]
    text = f"{cfg.get('operator')}: " + ", ".join(pairs)
    gate = cfg.get("gate")
    return text + (f", classifier gate {float(gate):g}" if gate is not None else "")


def row_config_text(row: dict[str, Any], fold: str) -> str:
    cfg = row.get("config")
    if isinstance(cfg, dict) and "operator" in cfg:
        return describe_config(cfg)
    if isinstance(cfg, dict) and isinstance(cfg.get(fold), dict):
        return describe_config(cfg[fold])
    return "–"


def num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v
