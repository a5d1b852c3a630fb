"""Threshold grids, member subsets and the size limits of a search.

Limits, refused up front with the numbers in the message: a grid (thresholds, gates) of
more than ``MAX_GRID_LEVELS`` = 10,001 values, and a search of more than
``MAX_CONFIGURATIONS`` = 1,000,000 configurations (``n_configurations``: operators x
member subsets x thresholds per member x gates; each becomes a row of ranking.csv).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from ensemblecam.config import short_repr
from ensemblecam.ensemble.operators import parse_operator
from ensemblecam.errors import InputError

DEFAULT_GRID = "0:0.9:0.1"
#: most thresholds in one grid (per member; also the gate grid): 0:1:0.0001 fits
MAX_GRID_LEVELS = 10_001
#: most configurations (operator x member subset x thresholds x gate) one search scores;
#: every one becomes a row of ranking.csv (about 1 KB of RAM per row while ranked)
MAX_CONFIGURATIONS = 1_000_000


def parse_grid(spec: str | Sequence[float]) -> np.ndarray:
    """Threshold grid: ``"start:stop:step"`` (inclusive) or ``"0.1,0.5"`` or a sequence.

    Returned as sorted unique float32 values (the dtype maps are compared in); more than
    ``MAX_GRID_LEVELS`` values is refused before any is generated.
    """
    shown = short_repr(spec)
    if isinstance(spec, str):
        try:
            if ":" in spec:
                start, stop, step = (float(v) for v in spec.split(":"))
                if not all(math.isfinite(v) for v in (start, stop, step)):
                    raise ValueError("start, stop and step must be finite")
                if step <= 0 or stop < start:
                    raise ValueError("need step > 0 and stop >= start")
                steps = (stop - start) / step
                if not steps < MAX_GRID_LEVELS:  # also inf (1e308 / 1e-308)
                    raise InputError(
                        f"threshold grid {shown}: {steps + 1:.4g} thresholds; "
                        f"at most {MAX_GRID_LEVELS:,} per member (use a larger "
                        f"step)"
                    )
                n = math.floor(steps + 1e-9) + 1
                values = [round(start + i * step, 10) for i in range(n)]
            else:
                values = [float(v) for v in spec.split(",") if v.strip()]
        except InputError:
            raise
        except ValueError as exc:
            raise InputError(
                f"threshold grid {shown}: expected start:stop:step or a list "
                f"of numbers ({short_repr(str(exc))})"
            ) from exc
    else:
        values = [float(v) for v in spec]
    grid = np.unique(np.asarray(values, dtype=np.float32))
    if grid.size == 0 or not np.all(np.isfinite(grid)):
        raise InputError(f"threshold grid {shown}: empty or not finite")
    if grid.size > MAX_GRID_LEVELS:
        raise InputError(
            f"threshold grid {shown}: {grid.size:,} thresholds; at most "
            f"{MAX_GRID_LEVELS:,} per member"
        )
    return grid


def n_configurations(
    n_members: int,
    levels: int,
    operators: Sequence[str],
    max_members: int | None = None,
    gate_levels: int = 0,
) -> int:
    """Configurations a search scores: for every member subset U (up to ``max_members``),
    ``levels`` thresholds if |U| = 1, else per distinct operator ``levels`` (mean) or
    ``levels ** |U|``; times ``gate_levels + 1`` (no gate, then each gate threshold)."""
    total = 0
    top = n_members if max_members is None else min(max_members, n_members)
    for size in range(1, top + 1):
        if size == 1:
            per = levels
        else:
            kinds = {parse_operator(op, size) for op in operators}
            per = sum(levels if kind == "mean" else levels**size for kind, _ in kinds)
        total += math.comb(n_members, size) * per
    return total * (gate_levels + 1)


def check_search_size(n: int, levels: int) -> None:
    """Refuse a search of more than ``MAX_CONFIGURATIONS`` configurations."""
    if n > MAX_CONFIGURATIONS:
        raise InputError(
            f"threshold grid of {levels:,} values is too fine for this search: {n:,} "
            f"configurations (operators x member subsets x thresholds per member x gates); "
            f"at most {MAX_CONFIGURATIONS:,}: use a coarser grid, fewer operators or "
            f"--max-members"
        )


def subsets_of(
    m: int, max_members: int | None = None, min_members: int = 1
) -> list[tuple[int, ...]]:
    """All member subsets with min_members..max_members members (default: all)."""
    hi = m if max_members is None else min(max_members, m)
    sizes = range(min_members, hi + 1)
    return [u for size in sizes for u in itertools.combinations(range(m), size)]
