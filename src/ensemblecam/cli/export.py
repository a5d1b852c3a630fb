"""``ensemblecam export``: per-slice masks (and maps) back to NIfTI in the scans' geometry.

Input formats (what evaluate / predict hand over):

* ``masks.npz`` with arrays ``index`` (int64, store indices, unique) and ``masks``
  (uint8 {0, 1}, shape ``(n, H, W)`` with ``H, W`` the store's slice size); ``--masks``
  may also name a folder holding ``masks.npz``.
* ``--maps``: ``maps.npz`` with arrays ``index`` (int64) and ``maps`` (float, ``(n, H, W)``),
  a folder holding ``maps.npz``, or a map-store member folder (``meta.json``, ``index.npy``,
  ``maps.npy``; dequantised to [0, 1]).
* ``--ground-truth``: the store's own masks (to check alignment in 3D Slicer / ITK-SNAP).

Output: ``<out>/<case>.nii.gz`` (uint8 0/1), ``<out>/<case>_map.nii.gz`` (float32) with
each case's original shape and affine, and ``<out>/index.json`` written last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ensemblecam.cli import app
from ensemblecam.cli._common import ForceOption, one_line_errors
from ensemblecam.errors import InputError
from ensemblecam.io import fsutil
from ensemblecam.io.export import export_cases, ground_truth, load_slice_arrays
from ensemblecam.io.store import SliceStore


@app.command("export")
@one_line_errors
def export_command(
    store: Annotated[Path, typer.Option("--store", help="Slice store the slices belong to.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the NIfTI files.")],
    masks: Annotated[
        Path | None,
        typer.Option("--masks", help="masks.npz (arrays index, masks) or a folder holding it."),
    ] = None,
    maps: Annotated[
        Path | None,
        typer.Option(
            "--maps", help="maps.npz (arrays index, maps), a folder holding it, or a map-set."
        ),
    ] = None,
    gt: Annotated[
        bool,
        typer.Option("--ground-truth", help="Export the store's own ground-truth masks."),
    ] = False,
    force: ForceOption = False,
) -> None:
    """Write masks (uint8) and maps (float32) as NIfTI in each case's original geometry."""
    if gt and masks is not None:
        raise InputError("--masks and --ground-truth: give one of them, not both")
    if not gt and masks is None and maps is None:
        raise InputError("nothing to export: give --masks, --maps or --ground-truth")
    inputs = [store, _named_file(masks, "masks.npz"), _named_file(maps, "maps.npz")]
    fsutil.check_not_input(out, inputs)
    slice_store = SliceStore.open(store)
    source: dict[str, str] = {}
    map_pair = load_slice_arrays(maps, "maps") if maps is not None else None
    if maps is not None:
        source["maps"] = str(maps)
    if gt or masks is not None:
        if gt:
            idx, arr = ground_truth(slice_store)
            source["masks"] = "ground-truth"
        else:
            assert masks is not None
            idx, arr = load_slice_arrays(masks, "masks")
            source["masks"] = str(masks)
        with fsutil.output_guard(out, inputs):
            index = export_cases(
                slice_store, idx, arr, out, "mask", maps=map_pair, force=force, source=source
            )
    else:
        assert map_pair is not None
        with fsutil.output_guard(out, inputs):
            index = export_cases(slice_store, *map_pair, out, "map", force=force, source=source)
    typer.echo(f"exported {len(index['cases'])} cases ({', '.join(index['kinds'])}) to {out}")


def _named_file(path: Path | None, name: str) -> Path | None:
    """The input a ``--masks``/``--maps`` value stands for: ``<folder>/<name>`` when the
    folder holds that file, else the value itself (a file or a map-set folder)."""
    if path is not None and path.is_dir() and (path / name).is_file():
        return path / name
    return path
