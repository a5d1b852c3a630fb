"""``ensemblecam prepare`` (volumes -> slice store) and ``ensemblecam split``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ensemblecam.cli import app
from ensemblecam.cli._common import ForceOption
from ensemblecam.cli.options import config_command
from ensemblecam.config import PrepareConfig, SplitConfig
from ensemblecam.io import fsutil


@config_command(app, "prepare")
def prepare_command(cfg: PrepareConfig, force: ForceOption = False) -> None:
    """Volumes -> 2-D slices in a slice store (resumes an interrupted run)."""
    from ensemblecam.stages.prepare import prepare_store

    with fsutil.output_guard(cfg.out, [cfg.data, cfg.labels_csv]):
        path = prepare_store(cfg, force=force)
    from ensemblecam.io.store import SliceStore

    store = SliceStore.open(path)
    n_pos = int(store.labels.sum())
    print(
        f"wrote {path}: {len(store.case_names)} cases, {store.n_slices} slices "
        f"({n_pos} positive), channels {','.join(store.channels)}, size "
        f"{store.size[0]}x{store.size[1]}"
    )


@config_command(app, "split")
def split_command(cfg: SplitConfig, force: ForceOption = False) -> None:
    """Patient-level splits (k-fold, holdout or a user list) written as a JSON file."""
    from ensemblecam.io.split import make_splits, split_summary
    from ensemblecam.io.store import SliceStore

    fsutil.check_writable(
        cfg.out if cfg.out is not None else cfg.store / "splits.json", folder=False
    )
    target, result = make_splits(cfg, force=force)
    rows = split_summary(SliceStore.open(cfg.store), result)
    table = Table(title=f"{target} ({cfg.scheme}, seed {cfg.seed})")
    for col in rows[0]:
        table.add_column(col, justify="left" if col in ("fold", "part") else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)
