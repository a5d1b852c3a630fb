"""Pass 1's per-slice histograms on disk, read back for the search's top-K pass."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from ensemblecam.ensemble.counting import revcum

#: Pass 1 streams the per-slice histograms that the top-K rows need to temporary
#: np.memmap files (system temp dir, deleted afterwards) when they take at most this many
#: bytes on disk; above it, the top-K pass reads the maps a second time instead.
SLICE_CACHE_BYTES = 256 * 2**20


class SliceCache:
    """Per-slice histograms of pass 1 on disk, read back chunk by chunk for the top-K rows.

    ``joints[u]``: (N, (L+1)**m * 2) joint histogram of (member levels, gt) per slice (subsets
    with a vote/and/or candidate); ``members[i]``: (N, L * 2) per-slice counts of level > j
    (``revcum``) of the members of ``subsets`` (those that only need ``min``/``max``);
    subsets in neither are not cached (the top-K pass re-reads their maps); ``gt_pix``: (N,)
    lesion pixels per slice. Counts are <= pixels per slice: uint16 when that fits, else
    uint32. Files are anonymous temporary files: removed on ``close()`` or process exit.
    """

    MAX_READ = 2**22  #: cached values read into RAM at once (int64: 32 MiB)

    def __init__(
        self,
        case_ids: np.ndarray,
        npix: int,
        L: int,
        joints: Sequence[tuple[int, ...]],
        subsets: Sequence[tuple[int, ...]],
    ) -> None:
        n = len(case_ids)
        self.case_ids, self.L, self.npix = case_ids, L, npix
        self.subsets = set(subsets)
        members = sorted({i for u in subsets for i in u})
        self.dtype = np.dtype(np.uint16 if npix <= np.iinfo(np.uint16).max else np.uint32)
        self._files = contextlib.ExitStack()
        self.gt_pix = self._array(n, 1, np.dtype(np.uint32))[:, 0]
        self.joints = {u: self._array(n, (L + 1) ** len(u) * 2, self.dtype) for u in joints}
        self.members = {i: self._array(n, L * 2, self.dtype) for i in members}

    @staticmethod
    def nbytes(
        n: int,
        npix: int,
        L: int,
        joints: Sequence[tuple[int, ...]],
        subsets: Sequence[tuple[int, ...]],
    ) -> int:
        """Bytes on disk: N x (4 + itemsize x (sum_u (L+1)^|u| * 2 + #members * L * 2))."""
        item = 2 if npix <= np.iinfo(np.uint16).max else 4
        members = {i for u in subsets for i in u}
        per = sum((L + 1) ** len(u) * 2 for u in joints) + len(members) * L * 2
        return n * (4 + item * per)

    def _array(self, n: int, width: int, dtype: np.dtype) -> np.ndarray:
        # lives as long as the cache; closed (and so deleted) by close()
        f = tempfile.TemporaryFile(prefix="ensemblecam-search-")  # noqa: SIM115
        self._files.enter_context(f)
        return np.memmap(f, dtype=dtype, mode="w+", shape=(n, width))

    def write(
        self,
        start: int,
        gt_pix: np.ndarray,
        joints: dict[tuple[int, ...], np.ndarray],
        member_R: Callable[[int], np.ndarray],
    ) -> None:
        """Store one chunk of pass 1 at rows start.. (joints flat (S, -1); member_R(i))."""
        stop = start + len(gt_pix)
        self.gt_pix[start:stop] = gt_pix
        for u, arr in self.joints.items():
            arr[start:stop] = joints[u]
        for i, arr in self.members.items():
            arr[start:stop] = member_R(i).reshape(stop - start, -1)

    def has(self, u: tuple[int, ...]) -> bool:
        """Whether the per-slice counts of subset ``u`` are cached (else: re-read maps)."""
        return u in self.joints or u in self.subsets

    def hists(
        self, start: int, stop: int, u: tuple[int, ...], tgrids: list[np.ndarray]
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Per-slice (member_R, joint) of coarse levels, as the top-K pass builds from maps.

        Coarse level #{t in T: t < level}: the levels of one coarse level are a run, so
        the joint reduces with ``np.add.reduceat`` and member_R is a column pick.
        """
        s, L = stop - start, self.L
        if u in self.joints:
            src = self.joints[u]
            step = max(1, self.MAX_READ // src.shape[1])  # rows read at once: bounded RAM
            parts = []
            for a in range(start, stop, step):
                b = min(a + step, stop)
                part = np.asarray(src[a:b], np.int64).reshape((b - a,) + (L + 1,) * len(u) + (2,))
                for j, tg in enumerate(tgrids):
                    # first level of coarse level c: 0, then T[c-1] + 1
                    part = np.add.reduceat(part, np.concatenate([[0], tg + 1]), axis=1 + j)
                parts.append(part)
            joint = parts[0] if len(parts) == 1 else np.concatenate(parts)
            member_R = []
            for j in range(len(u)):
                others = tuple(1 + o for o in range(len(u)) if o != j)
                member_R.append(revcum(joint.sum(axis=others), 1))
            return member_R, joint
        assert u in self.subsets
        return [
            np.asarray(self.members[i][start:stop], np.int64).reshape(s, L, 2)[:, tg]
            for i, tg in zip(u, tgrids, strict=True)
        ], None

    def close(self) -> None:
        self.joints.clear()
        self.members.clear()
        del self.gt_pix
        self._files.close()
