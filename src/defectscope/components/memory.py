"""Memory banks: exact nearest neighbours (chunked torch, or faiss) and the greedy coreset.

Nothing here forms an N x N matrix: distances are computed in chunks whose size is
bounded by ``max_elems`` entries, and the coreset keeps only a running vector of
minimum distances.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import numpy as np
import torch

from defectscope.errors import ConfigError

MAX_ELEMS = 1 << 24  # ~64 MB of float32 distances per chunk


def has_faiss() -> bool:
    return importlib.util.find_spec("faiss") is not None


def squared_distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor | None = None) -> torch.Tensor:
    """||a_i - b_j||^2 for all pairs, via the expansion |a|^2 + |b|^2 - 2ab, clamped at 0."""
    b_sq = (b * b).sum(1) if b_sq is None else b_sq
    d = torch.addmm(b_sq[None, :], a, b.T, beta=1.0, alpha=-2.0)
    d += (a * a).sum(1, keepdim=True)
    return d.clamp_(min=0.0)


def _tiles(q: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, bank_chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first bank row, |b|^2 - 2ab) for the bank taken ``bank_chunk`` rows at a time: one
    fused product per tile; |a|^2, constant along a row, is left to the caller."""
    for bs in range(0, bank.shape[0], bank_chunk):
        yield bs, torch.addmm(bank_sq[None, bs : bs + bank_chunk], q, bank[bs : bs + bank_chunk].T, beta=1.0, alpha=-2.0)


def _nearest_in_tiles(
    q: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, k: int, bank_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances and indices of the k nearest bank rows of every row of ``q``."""
    best_d = torch.full((q.shape[0], k), float("inf"))
    best_i = torch.zeros((q.shape[0], k), dtype=torch.long)
    for bs, d in _tiles(q, bank, bank_sq, bank_chunk):
        if k == 1:
            cd, ci = d.min(dim=1, keepdim=True)
            better = cd < best_d
            best_d, best_i = torch.where(better, cd, best_d), torch.where(better, ci + bs, best_i)
            continue
        cd, ci = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_d, pos = torch.cat([best_d, cd], 1).topk(k, dim=1, largest=False)
        best_i = torch.cat([best_i, ci + bs], 1).gather(1, pos)
    return (best_d + (q * q).sum(1, keepdim=True)).clamp(min=0.0), best_i


def _nearest_distance_tiles(q: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, bank_chunk: int) -> torch.Tensor:
    """Distance of every row of ``q`` to its nearest bank row, without the index: one
    minimum per tile (an exported graph then needs no ArgMin pass over every tile, which
    cost onnxruntime a quarter of PatchCore's scoring time)."""
    best = torch.full((q.shape[0],), float("inf"))
    for _, d in _tiles(q, bank, bank_sq, bank_chunk):
        best = torch.minimum(best, d.amin(dim=1))
    return (best + (q * q).sum(1)).clamp(min=0.0).sqrt()


def _knn_torch(
    query: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, k: int, max_elems: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled exact search: distance tiles small enough to stay in cache, merged top-k.

    |a|^2, constant along a row, is added to the k survivors only, which saves two passes
    over every tile and gives the same floats (adding a constant keeps the order). Inside
    an exported graph (`defectscope.modelfiles.export`) the batch size is symbolic, so the whole query
    is one block and only the bank is tiled (the same products, unrolled in the graph)."""
    bank_chunk = max(k, min(bank.shape[0], 1024, max_elems))
    if torch.compiler.is_exporting():
        d, i = _nearest_in_tiles(query, bank, bank_sq, k, bank_chunk)
        return d.sqrt(), i
    q_chunk = max(1, min(512, max_elems // bank_chunk))
    out_d = torch.empty(query.shape[0], k)
    out_i = torch.empty(query.shape[0], k, dtype=torch.long)
    for qs in range(0, query.shape[0], q_chunk):
        out_d[qs : qs + q_chunk], out_i[qs : qs + q_chunk] = _nearest_in_tiles(query[qs : qs + q_chunk], bank, bank_sq, k, bank_chunk)
    return out_d.sqrt_(), out_i


class Index:
    """Exact Euclidean nearest-neighbour index over the rows of ``bank``, built once.

    ``backend``: "torch" (tiled matrix products; the default), "faiss" (IndexFlatL2; needs
    faiss-cpu), or "auto" (faiss when installed). Measured here, faiss is 1.3x faster on a
    5k bank but 6x slower on small ones, and its OpenMP threads then slow torch's down by
    up to 80x in the same process, so it is only used when asked for.
    """

    def __init__(self, bank: torch.Tensor, backend: str = "torch") -> None:
        if bank.shape[0] == 0:
            raise ConfigError("The memory bank is empty: fit the detector on at least one image.")
        if backend == "auto":
            backend = "faiss" if has_faiss() else "torch"
        if backend not in ("torch", "faiss"):
            raise ConfigError(f"Unknown nearest-neighbour backend {backend!r}; use torch, faiss or auto.")
        self.bank, self.backend = bank.float().contiguous(), backend
        self.size = bank.shape[0]
        if backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatL2(bank.shape[1])
            self._faiss.add(self.bank.numpy())
        else:
            self._sq = (self.bank * self.bank).sum(1)

    def search(self, query: torch.Tensor, k: int = 1, max_elems: int = MAX_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, indices), both Q x k, nearest first."""
        k = min(k, self.size)
        query = query.float().contiguous()
        if self.backend == "faiss":
            d, i = self._faiss.search(query.numpy(), k)
            return torch.from_numpy(d).clamp_(min=0).sqrt_(), torch.from_numpy(i).long()
        return _knn_torch(query, self.bank, self._sq, k, max_elems)

    def nearest_distances(self, query: torch.Tensor) -> torch.Tensor:
        """Distance of each query row to its nearest bank row (Q). In an exported graph the
        tiles keep only their minimum (see `_nearest_distance_tiles`); here it is `search`'s."""
        if torch.compiler.is_exporting() and self.backend == "torch":
            return _nearest_distance_tiles(query.float(), self.bank, self._sq, max(1, min(self.size, 1024)))
        return self.search(query, 1)[0][:, 0]


def knn(
    query: torch.Tensor, bank: torch.Tensor, k: int = 1, *, backend: str = "torch", max_elems: int = MAX_ELEMS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest bank rows (Euclidean) for each query row: (distances, indices), Q x k."""
    return Index(bank, backend).search(query, k, max_elems)


def random_projection(dim_in: int, dim_out: int, seed: int) -> torch.Tensor:
    """A seeded Gaussian projection matrix (dim_in x dim_out), Johnson-Lindenstrauss scaled."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=g) / dim_out**0.5


def principal_axes(x: torch.Tensor, seed: int, max_rows: int = 65536) -> torch.Tensor:
    """D x D orthogonal matrix whose columns are the principal axes of ``x``'s rows, largest
    variance first (from a seeded sample of ``max_rows``). Rotating by it keeps every
    distance, so the greedy is unchanged, and puts the large coordinates first."""
    if x.shape[0] > max_rows:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]]
    x = x.double() - x.double().mean(0)
    _, vectors = torch.linalg.eigh(x.T @ x)
    return vectors.flip(1).float()


CELL_ROWS = 512  # rows per cell of the coreset's lazy greedy (`greedy_coreset`)
NEIGHBOUR_CELLS = 2  # cells a new centre updates at once: its own and the nearest other


def _nearest_seed(x: torch.Tensor, seeds: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of each row's nearest seed row, in row chunks."""
    seed_sq = (seeds**2).sum(1)
    return torch.cat([squared_distances(x[lo : lo + chunk], seeds, seed_sq).argmin(1) for lo in range(0, x.shape[0], chunk)])


def _partition(x: torch.Tensor, n_cells: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cells of about equal size: (row order sorted by cell, cell offsets into it, one seed
    row per cell). Two levels of Voronoi cells around seeded random rows (random seeds are
    dense where the data is): about sqrt(n_cells) coarse cells, each split among sub-seeds
    drawn from its own rows in proportion to its size, so each row is compared with about
    2 sqrt(n_cells) seeds instead of n_cells (4M rows into 8k cells: seconds, not minutes)."""
    total = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    n_coarse = max(1, min(n_cells, round(n_cells**0.5)))
    coarse = _nearest_seed(x, x[torch.randperm(total, generator=g)[:n_coarse]])
    coarse_order = torch.argsort(coarse, stable=True)
    counts = torch.bincount(coarse, minlength=n_coarse).tolist()
    cell = torch.empty(total, dtype=torch.long)
    seeds, first, lo = [], 0, 0
    for size in counts:
        rows = coarse_order[lo : lo + size]
        lo += size
        if size == 0:
            continue
        k = max(1, min(size, round(n_cells * size / total)))
        pick = rows[torch.randperm(size, generator=g)[:k]]
        seeds.append(x[pick])
        cell[rows] = first + _nearest_seed(x[rows], seeds[-1])
        first += k
    offsets = torch.zeros(first + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(cell, minlength=first).cumsum(0)
    return torch.argsort(cell, stable=True), offsets, torch.cat(seeds)


def greedy_coreset(
    features: torch.Tensor,
    n: int,
    *,
    proj_dim: int | None = None,
    seed: int = 0,
    cell_rows: int | None = CELL_ROWS,
    neighbours: int = NEIGHBOUR_CELLS,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Indices of ``n`` rows chosen by greedy k-center selection (PatchCore, Sec. 3.2).

    Start from a seeded random row; repeatedly add the row farthest from the chosen set
    (Euclidean, float32), with distances measured after a seeded random projection to
    ``proj_dim`` dims (none if None, the default, or not smaller than the feature size).
    A projection makes each step cheaper for wide features but distorts the distances the
    greedy maximises: at 32k of PatchCore's 152-d patches, selection after a 128-d
    projection left a 9-12% larger covering radius in the real space (yet PatchCore detects
    better with it on two of three datasets; see the README).

    Plain greedy reads all N rows per centre: hours for millions of patches. Here the rows
    are split into cells of about ``cell_rows`` rows (`_partition`; at most n / 4 cells; one
    cell when ``cell_rows`` is None) and the compiled loop in
    `defectscope.components.kcenter` applies centres to cells lazily, checking the farthest bound
    before taking it: the plain greedy's choices from the same first row, with a fraction
    of the reads. ``neighbours``: cells a new centre updates at once. Memory: one float32
    copy of the (projected, rotated onto their principal axes) rows, sorted by cell; no N x N matrix. benchmarks/coreset.py
    measures time and covering radius against exact greedy and anomalib's KCenterGreedy.
    """
    from defectscope.components import kcenter  # numba compiles (or loads its cache) on first use

    total = features.shape[0]
    if n >= total:
        return torch.arange(total)
    if n < 1:
        raise ConfigError(f"A coreset needs at least one point (asked for {n}).")
    if neighbours < 1:
        raise ConfigError(f"A coreset centre updates at least its own cell (neighbours={neighbours}).")
    x = features.float()
    if proj_dim is not None and proj_dim < x.shape[1]:
        x = x @ random_projection(x.shape[1], proj_dim, seed)
    x = x @ principal_axes(x, seed)
    n_cells = 1 if cell_rows is None else max(1, min(total // cell_rows, n // 4))
    order, offsets, seed_rows = _partition(x, n_cells, seed)
    n_cells = offsets.numel() - 1
    xs = x[order].numpy()
    del x
    first = int(torch.randint(total, (1,), generator=torch.Generator().manual_seed(seed)))
    off, seeds = offsets.numpy(), seed_rows.numpy()
    min_d = np.empty(total, dtype=np.float32)
    top, top_at = np.full(n_cells, -1.0, dtype=np.float32), np.zeros(n_cells, dtype=np.int64)
    centres, chosen = np.empty((n, xs.shape[1]), dtype=np.float32), np.empty(n, dtype=np.int64)
    applied = np.zeros((n_cells, (n + 63) // 64), dtype=np.uint64)  # bit c of row j: centre c is in cell j's bounds
    chosen[0] = int((order == first).nonzero())  # its position among the sorted rows
    centres[0], applied[:, 0] = xs[chosen[0]], 1
    kcenter.start(xs, off, int(chosen[0]), min_d, top, top_at)
    k, step = 1, max(1, n // 100)
    while k < n:
        k = kcenter.advance(xs, off, seeds, neighbours, min_d, top, top_at, centres, chosen, applied, k, min(n, k + step))
        if progress is not None:
            progress(k, n)
    return order[torch.from_numpy(chosen)]


def covering_radius(features: torch.Tensor, chosen: torch.Tensor, *, max_rows: int | None = None, seed: int = 0) -> float:
    """max over rows of the distance to the nearest chosen row: what the coreset minimises.

    ``max_rows``: measure on a seeded sample of that many rows (a lower bound, cheap for
    banks of millions of patches); None: every row (exact)."""
    rows = features
    if max_rows is not None and features.shape[0] > max_rows:
        pick = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        rows = features[pick]
    dist, _ = knn(rows, features[chosen], 1)
    return float(dist.max())
