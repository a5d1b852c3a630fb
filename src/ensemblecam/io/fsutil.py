"""Atomic file and folder writes.

Nothing a later stage could mistake for complete output is ever left under a final
name: every file is written under a temporary name in the same folder and renamed
(``os.replace`` is atomic on POSIX); folders are built as ``.<name>.partial`` and
renamed when complete.

Ownership: every output folder ensemblecam builds holds a marker file ``.ensemblecam``
(JSON ``{"tool": "ensemblecam", "stage": ...}``). ``--force`` only ever replaces a folder
with that marker; an output folder that is, holds or lies inside an input is refused
before any work (:func:`check_not_input`). :func:`output_guard` wraps a command's work:
it makes those checks, holds the lock file ``.<name>.lock`` beside the output folder
(pid and host; a lock whose process is gone is taken over with a notice) and, when the
command is refused, removes the ``.partial`` folders it created.

JSON is written strictly (RFC 8259): NaN and +-Inf become ``null``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
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
    """Write ``obj`` as indented strict JSON to ``path`` atomically (NaN, +-Inf -> null)."""
    write_text(path, json_text(obj) + "\n")


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj``: non-finite floats become ``null``; numpy scalars and
    arrays become numbers and lists, paths strings (``allow_nan=False`` guarantees it)."""
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False)


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN/+-Inf float replaced by None, tuples as lists, numpy values
    as Python values and paths as strings; other types are left for ``json`` to refuse."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, np.generic):
        return strict_json(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save ``array`` as .npy atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def file_sha256(path: str | os.PathLike[str], digest: Any = None) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks; with ``digest`` (a
    hashlib object) the bytes are added to it instead. An unreadable file is one
    :class:`InputError` line."""
    h = hashlib.sha256() if digest is None else digest
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return h.hexdigest()


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Read JSON, turning a missing or broken file into one :class:`InputError` line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable {what} ({exc})") from exc


#: marker file in every folder ensemblecam writes; ``--force`` replaces only such folders
OWNER_MARKER = ".ensemblecam"


def write_owner_marker(folder: str | os.PathLike[str], stage: str) -> None:
    """Mark ``folder`` as written by ensemblecam (``.ensemblecam``: tool and stage)."""
    folder = Path(folder)
    if not (folder / OWNER_MARKER).is_file():
        write_text(folder / OWNER_MARKER, json_text({"tool": "ensemblecam", "stage": stage}))


def owner_stage(folder: str | os.PathLike[str]) -> str | None:
    """The stage named by ``folder``'s marker file; None if it has no valid marker."""
    try:
        mark = json.loads((Path(folder) / OWNER_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(mark, dict) or mark.get("tool") != "ensemblecam":
        return None
    return str(mark.get("stage"))


def is_ours(folder: str | os.PathLike[str]) -> bool:
    """True if ``folder`` holds ensemblecam's marker file (``tool`` = ``ensemblecam``)."""
    return owner_stage(folder) is not None


def check_replaceable(path: str | os.PathLike[str], force: bool, marker: str) -> None:
    """Refuse an output folder that may not receive new results.

    ``path`` must be a folder or absent. A non-empty folder without ensemblecam's marker
    is never replaced (not even with ``force``); one with the result file ``marker``
    needs ``force``, and so does any other non-empty folder of ours.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not is_ours(path):
        raise InputError(
            f"{path}: folder is not empty and was not written by ensemblecam (no "
            f"{OWNER_MARKER} file); it is never replaced, not even with --force"
        )
    if force:
        return
    if (path / marker).exists():
        raise InputError(f"{path}: already holds results ({marker}); use --force to replace them")
    raise InputError(f"{path}: folder is not empty; use --force to replace it")


def partial_dir(path: str | os.PathLike[str]) -> Path:
    """The build folder ``.<name>.partial`` beside ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def prepare_output_dir(
    path: str | os.PathLike[str], force: bool, marker: str, stage: str | None = None
) -> Path:
    """Check that ``path`` may receive new results; return the ``.partial`` build folder.

    See :func:`check_replaceable`. Results are built in ``.<name>.partial`` beside
    ``path`` (kept across a kill so a stage can resume; marked as ours) and moved into
    place by :func:`commit_output_dir`.
    """
    path = Path(path)
    check_replaceable(path, force, marker)
    partial = partial_dir(path)
    partial.mkdir(parents=True, exist_ok=True)
    write_owner_marker(partial, stage or Path(marker).stem)
    return partial


def commit_output_dir(
    partial: Path, path: str | os.PathLike[str], stage: str | None = None
) -> None:
    """Move a finished ``.partial`` folder to ``path`` (marked as ours), replacing what
    was there, which must be a folder of ours (or empty)."""
    path = Path(path)
    write_owner_marker(partial, stage or path.name)
    if path.is_dir() and any(path.iterdir()) and not is_ours(path):
        raise InputError(f"{path}: was not written by ensemblecam; refusing to replace it")
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old)
    else:
        os.replace(partial, path)


# --------------------------------------------------------------------------- inputs, locks


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def check_not_input(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None],
    inside_ok: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """Refuse an output folder that is, holds or lies inside an input (symlinks resolved).

    ``inside_ok`` inputs may hold the output (a run folder holds its report) but may
    not be it or lie inside it. Checked before any work, whatever ``--force`` says.
    """
    o = _real(out)
    pairs = [(p, False) for p in inputs] + [(p, True) for p in inside_ok]
    for given, allow_inside in pairs:
        if given is None:
            continue
        p = _real(given)
        rel = (
            "is"
            if o == p
            else "holds"
            if o in p.parents
            else None
            if allow_inside
            else "lies inside"
            if p in o.parents
            else None
        )
        if rel is not None:
            raise InputError(
                f"{out}: output folder {rel} the input {given}; choose an output folder "
                "apart from the inputs (refused with or without --force)"
            )


def check_writable(
    path: str | os.PathLike[str] | None, what: str = "--out", folder: bool = True
) -> None:
    """Refuse, before any work, an output path that cannot be written.

    ``path`` (a folder, or a file if not ``folder``) must not exist as the other kind, and
    the nearest existing folder of its parent must be a folder that is writable (the
    result is built beside ``path`` and renamed; missing parents are created); an existing
    output folder must be writable too. None is not checked.
    """
    if path is None:
        return
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{what} {path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise InputError(f"{what} {path}: is a folder, not a file")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} {path}: {parent} is a file, not a folder")
    for place in [parent] + ([path] if folder and path.is_dir() else []):
        if not os.access(place, os.W_OK | os.X_OK):
            raise InputError(
                f"{what} {path}: cannot write in {place} (permission denied or read-only)"
            )


def lock_path(folder: str | os.PathLike[str]) -> Path:
    """The lock file ``.<name>.lock`` beside ``folder``."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.lock")


def _worker_rank() -> bool:
    """True in a non-zero rank of a multi-process launch (rank 0 holds the lock)."""
    return any(
        os.environ.get(v, "0").strip() not in ("", "0") for v in ("LOCAL_RANK", "NODE_RANK", "RANK")
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _try_create_lock(lock: Path, text: str) -> bool:
    """Create ``lock`` holding ``text`` if it does not exist (atomic: link of a full file)."""
    tmp = _tmp_name(lock)
    tmp.write_text(text)
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: exclusive create
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock file of ``folder`` (``.<name>.lock`` beside it: pid, host, start).

    A lock held by a live process (or one on another host) is one InputError naming the
    folder and the pid; a lock whose process is gone (same host) is taken over with a
    notice. The process already holding the lock may enter again (nested stages).
    """
    folder = Path(folder)
    lock = lock_path(folder)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    owned = False
    for _ in range(5):
        try:
            owned = _try_create_lock(lock, json.dumps(me))
        except OSError as exc:
            raise InputError(
                f"{folder}: cannot write the lock file {lock} ({exc.strerror})"
            ) from exc
        if owned:
            break
        holder = _read_lock(lock)
        if holder is not None and holder.get("host") == me["host"]:
            if holder["pid"] == me["pid"]:
                break  # this process holds it already
            if _pid_alive(holder["pid"]):
                raise InputError(
                    f"{folder}: in use by another ensemblecam process (pid {holder['pid']}, "
                    f"lock file {lock}); wait for it to finish"
                )
        elif holder is not None:
            raise InputError(
                f"{folder}: in use by pid {holder['pid']} on host {holder.get('host')} "
                f"(lock file {lock}); delete the lock file if that process is gone"
            )
        what = "unreadable" if holder is None else f"of pid {holder['pid']} (no longer running)"
        print(f"note: {lock}: taking over a stale lock {what}", file=sys.stderr)
        lock.unlink(missing_ok=True)
    else:
        raise InputError(f"{folder}: could not take the lock file {lock}")
    try:
        yield
    finally:
        if owned and (_read_lock(lock) or {}).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)


def _only_marker(folder: Path) -> bool:
    return folder.is_dir() and all(p.name == OWNER_MARKER for p in folder.iterdir())


@contextmanager
def output_guard(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    inside_ok: Iterable[str | os.PathLike[str] | None] = (),
    replaces: bool = True,
) -> Iterator[Path]:
    """Wrap a command writing the output folder ``out``; yield ``out``.

    Before any work: ``out`` must be writable (:func:`check_writable`), apart from the
    inputs (:func:`check_not_input`), not
    a non-empty folder ensemblecam did not write if the command ``replaces`` it as a whole
    (a map-store root only receives member folders), and not locked by another process
    (:func:`folder_lock`, held until the block ends). When the block is refused
    (InputError, or an OSError of the environment) nothing it started is left:
    ``.partial`` folders beside or directly inside ``out`` and folders that did not
    exist before (if they hold nothing else) are removed. Other ranks of a
    multi-process launch only check.
    """
    out = Path(out)
    check_writable(out)
    check_not_input(out, inputs, inside_ok)
    if replaces and out.is_dir() and any(out.iterdir()) and not is_ours(out):
        check_replaceable(out, True, "")  # the one-line refusal of a folder not ours
    if _worker_rank():
        yield out
        return
    missing = [p for p in [out, *out.parents] if not p.exists()]
    before = {partial_dir(out)} | (set(out.glob(".*.partial")) if out.is_dir() else set())
    before = {p for p in before if p.exists()}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out.parent}: cannot create the folder ({exc.strerror})") from exc
    try:
        with folder_lock(out):
            try:
                yield out
            except (InputError, OSError):
                news = {partial_dir(out)} | (set(out.glob(".*.partial")) if out.is_dir() else set())
                for p in news - before:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                if out in missing and _only_marker(out):
                    shutil.rmtree(out, ignore_errors=True)
                raise
    except (InputError, OSError):
        for p in missing[1:]:  # parents created for this command, deepest first
            try:
                p.rmdir()
            except OSError:
                break
        raise


@contextmanager
def reading_text(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn an unreadable, non-UTF-8 or malformed CSV/text file ``what`` met in the block
    into one :class:`InputError` line naming ``path``."""
    import csv

    try:
        yield
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: {what} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x})"
        ) from exc
    except csv.Error as exc:
        raise InputError(f"{path}: malformed {what} ({exc})") from exc


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts as CSV text (header = first row's keys; lists joined by '+', None blank)."""
    import csv
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    k: ("+".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v))
                    for k, v in r.items()
                }
            )
    return buf.getvalue()
