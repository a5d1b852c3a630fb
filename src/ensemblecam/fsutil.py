"""Atomic file and folder writes.

Nothing a later stage could mistake for complete output is ever left under a final
name: every file is written under a temporary name in the same folder and renamed
(``os.replace`` is atomic on POSIX); folders are built as ``.<name>.partial`` and
renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ensemblecam.errors import InputError


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save ``array`` as .npy atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Read JSON, turning a missing or broken file into one :class:`InputError` line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable {what} ({exc})") from exc


def prepare_output_dir(path: str | os.PathLike[str], force: bool, marker: str) -> Path:
    """Check that ``path`` may receive new results; return the ``.partial`` build folder.

    An existing complete result (``path/marker`` present) is refused unless ``force``.
    Results are built in ``.<name>.partial`` beside ``path`` (kept across a kill so a
    stage can resume) and moved into place by :func:`commit_output_dir`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder")
    if (path / marker).exists() and not force:
        raise InputError(f"{path}: already holds results ({marker}); use --force to replace them")
    if path.exists() and any(path.iterdir()) and not (path / marker).exists() and not force:
        raise InputError(f"{path}: folder is not empty; use --force to replace it")
    partial = path.with_name(f".{path.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def commit_output_dir(partial: Path, path: str | os.PathLike[str]) -> None:
    """Move a finished ``.partial`` folder to ``path``, replacing what was there."""
    path = Path(path)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old)
    else:
        os.replace(partial, path)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts as CSV text (header = first row's keys; lists joined by '+', None blank)."""
    import csv
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("+".join(map(str, v)) if isinstance(v, list) else
                                 ("" if v is None else v)) for k, v in r.items()})
    return buf.getvalue()
