"""Memory banks: exact nearest neighbours (chunked torch, or faiss) and the greedy coreset.

Nothing here forms an N x N matrix: distances are computed in chunks whose size is
bounded by ``max_elems`` entries, and the coreset keeps only a running vector of
minimum distances.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
    an exported graph (`defectscope.export`) the batch size is symbolic, so the whole query
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


CELL_ROWS = 4096  # rows per cell of the lazy coreset (`greedy_coreset`)
NEIGHBOUR_CELLS = 2  # cells a new centre updates at once: its own and the nearest other
MIN_CELLS = 16  # below this many cells (65k rows) the plain loop is faster than the lazy one
LAZY_TOLERANCE = 1e-3  # relative: a bound this close to the true distance counts as exact (bfloat16 sums)


def _lower(min_d: torch.Tensor, rows: torch.Tensor, rows_sq: torch.Tensor, centre: torch.Tensor, centre_sq: torch.Tensor, buf: torch.Tensor) -> None:
    """min_d = min(min_d, ||rows - centre||^2) in place: one matrix-vector product in the
    rows' dtype, squared norms and the minimum in float32 (``buf``: scratch of min_d's size)."""
    torch.add(rows_sq, torch.mv(rows, centre).float(), alpha=-2.0, out=buf)
    buf += centre_sq
    torch.minimum(min_d, buf, out=min_d)


def _greedy_loop(
    x: torch.Tensor, n: int, first: int, progress: Callable[[int, int], None] | None
) -> torch.Tensor:
    """Greedy k-center: per new centre one `_lower` pass over all rows."""
    sq = (x.float() ** 2).sum(1)
    min_d = torch.full((x.shape[0],), float("inf"))
    dist = torch.empty(x.shape[0])
    chosen = torch.empty(n, dtype=torch.long)
    idx, step = first, max(1, n // 100)
    for i in range(n):
        chosen[i] = idx
        _lower(min_d, x, sq, x[idx], sq[idx], dist)
        idx = int(torch.argmax(min_d))
        if progress is not None and (i % step == 0 or i == n - 1):
            progress(i + 1, n)
    return chosen


@dataclass
class _Cells:
    """Rows sorted by their nearest seed row: cell j is rows[offsets[j]:offsets[j + 1]]."""

    order: torch.Tensor  # original row index of each sorted row
    offsets: list[int]
    seeds: torch.Tensor  # sorted positions of the seed rows (the first centres)
    seed_rows: torch.Tensor  # C x d, float32
    min_d: torch.Tensor  # squared distance of each sorted row to its seed


def _partition(x: torch.Tensor, n_cells: int, seed: int, chunk: int = 65536) -> _Cells:
    """Voronoi cells of ``n_cells`` seeded random rows (random seeds give cells of about
    equal size wherever the data is dense); distances in float32, in row chunks."""
    total = x.shape[0]
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_cells]
    seed_rows = x[pick].float()
    seed_sq = (seed_rows**2).sum(1)
    near = torch.empty(total, dtype=torch.long)
    d_near = torch.empty(total)
    for lo in range(0, total, chunk):
        d = squared_distances(x[lo : lo + chunk].float(), seed_rows, seed_sq)
        torch.min(d, dim=1, out=(d_near[lo : lo + chunk], near[lo : lo + chunk]))
    order = torch.argsort(near, stable=True)
    counts = torch.bincount(near, minlength=n_cells)
    where = torch.empty(total, dtype=torch.long)
    where[order] = torch.arange(total)
    return _Cells(order, [0, *counts.cumsum(0).tolist()], where[pick], seed_rows, d_near[order])


class _CellState:
    """Running min-distances of rows sorted into cells, with each cell's farthest row.

    ``min_d`` holds, per row, the smallest squared distance to the centres applied to its
    cell so far: an upper bound of its distance to all centres (exact for the seeds)."""

    def __init__(self, x: torch.Tensor, cells: _Cells) -> None:
        self.xs = x[cells.order].contiguous()
        self.sq = (self.xs.float() ** 2).sum(1)
        self.min_d, self.off = cells.min_d.clone(), cells.offsets
        n_cells = len(self.off) - 1
        self.top = torch.full((n_cells,), -1.0)
        self.top_at = torch.zeros(n_cells, dtype=torch.long)
        self._buf = torch.empty(max(self.off[j + 1] - self.off[j] for j in range(n_cells)))
        for j in range(n_cells):
            self._refresh(j, self.min_d[self.off[j] : self.off[j + 1]])

    def _refresh(self, j: int, seg: torch.Tensor) -> None:
        if seg.numel():
            value, at = seg.max(0)
            self.top[j], self.top_at[j] = value, self.off[j] + at

    def apply(self, centre: torch.Tensor, centre_sq: torch.Tensor, j: int) -> None:
        """Lower the min-distances of cell j's rows by one centre (a row of ``xs``' dtype)."""
        lo, hi = self.off[j], self.off[j + 1]
        if hi == lo:
            return
        seg = self.min_d[lo:hi]
        _lower(seg, self.xs[lo:hi], self.sq[lo:hi], centre, centre_sq, self._buf[: hi - lo])
        self._refresh(j, seg)


def _lazy_cell_greedy(
    x: torch.Tensor, n: int, cells: _Cells, neighbours: int, progress: Callable[[int, int], None] | None
) -> torch.Tensor:
    """Exact greedy k-center with lazily applied centres (the seeds are the first centres).

    A new centre lowers the min-distances of its own cell and the ``neighbours - 1`` cells
    whose seeds are nearest; other rows keep upper bounds. The candidate, the row with the
    largest bound, is checked against every chosen centre: if one lies nearer than its
    bound, that centre is applied to the candidate's cell and the search repeats; otherwise
    its bound is exact and at least every other row's true distance, so it is the farthest
    row, the one exact greedy picks. Work: the cells centres touch, plus one check of
    n_chosen rows per candidate, instead of all N rows per centre."""
    state = _CellState(x, cells)
    d = x.shape[1]
    centres = torch.empty(n, d, dtype=x.dtype)
    centre_sq = torch.empty(n)
    seed_sq = (cells.seed_rows**2).sum(1)
    k = min(n, cells.seeds.numel())
    chosen = torch.empty(n, dtype=torch.long)
    chosen[:k] = cells.seeds[:k]
    centres[:k], centre_sq[:k] = state.xs[chosen[:k]], state.sq[chosen[:k]]
    applied: set[tuple[int, int]] = set()  # (centre, cell) pairs already in the bounds
    step = max(1, n // 100)
    while k < n:
        j0 = int(torch.argmax(state.top))
        r = int(state.top_at[j0])
        xr, sq_r = state.xs[r], state.sq[r]
        true = centre_sq[:k] - 2.0 * torch.mv(centres[:k], xr).float() + sq_r
        nearest, c = true.min(0)
        c = int(c)
        if float(nearest) < float(state.min_d[r]) * (1.0 - LAZY_TOLERANCE) and (c, j0) not in applied:
            applied.add((c, j0))  # once per pair: a second time could only repeat rounding
            state.apply(centres[c], centre_sq[c], j0)
            continue
        chosen[k], centres[k], centre_sq[k] = r, xr, sq_r
        near = torch.topk(seed_sq - 2.0 * (cells.seed_rows @ xr.float()), neighbours, largest=False).indices.tolist()
        for j in {j0, *near[: neighbours - 1]}:
            applied.add((k, j))
            state.apply(xr, sq_r, j)
        k += 1
        if progress is not None and (k % step == 0 or k == n):
            progress(k, n)
    return cells.order[chosen]


def greedy_coreset(
    features: torch.Tensor,
    n: int,
    *,
    proj_dim: int | None = None,
    precision: str = "bfloat16",
    seed: int = 0,
    cell_rows: int | None = CELL_ROWS,
    neighbours: int = NEIGHBOUR_CELLS,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Indices of ``n`` rows chosen by greedy k-center selection (PatchCore, Sec. 3.2).

    Start from a seeded random row; repeatedly add the row farthest from the chosen set,
    with distances measured after a seeded random projection to ``proj_dim`` dims (none if
    None, the default, or not smaller than the feature size). A projection makes each step
    cheaper for wide features but distorts the distances the greedy maximises: at 32k of
    PatchCore's 152-d patches, selection after a 128-d projection left a 9% larger
    covering radius in the real space than selection without one, in the same time (yet
    PatchCore detects better with it on two of three datasets; see the README).

    Only a running vector of min-distances is kept, never an N x N matrix. The loop is
    bound by reading the N x d matrix once per centre, so ``precision="bfloat16"`` (the
    default) stores the centred (projected) rows in bfloat16: half the memory traffic and a faster kernel on CPUs, at a relative
    distance error of about 2^-8 (benchmarks/patchcore_speed.py reports the covering radius
    it reaches against float32 selection). ``precision="float32"`` is exact.

    Exact greedy costs N x n row reads: hours for millions of patches. Above
    ``cell_rows`` rows per cell (None: always exact) the rows are split into Voronoi cells
    of about ``cell_rows`` rows around random seed rows, which are the first centres, and
    centres are applied to cells lazily (`_lazy_cell_greedy`): the same choices as exact
    greedy from those seeds, with a fraction of the reads. benchmarks/coreset.py measures
    its time and covering radius against exact greedy and anomalib's KCenterGreedy.
    """
    total = features.shape[0]
    if n >= total:
        return torch.arange(total)
    if n < 1:
        raise ConfigError(f"A coreset needs at least one point (asked for {n}).")
    if precision not in ("float32", "bfloat16"):
        raise ConfigError(f"Coreset precision must be float32 or bfloat16, got {precision!r}.")
    if neighbours < 1:
        raise ConfigError(f"A coreset centre updates at least its own cell (neighbours={neighbours}).")
    x = features.float()
    if proj_dim is not None and proj_dim < x.shape[1]:
        x = x @ random_projection(x.shape[1], proj_dim, seed)
    x = (x - x.mean(0)).to(getattr(torch, precision)).contiguous()
    n_cells = 0 if cell_rows is None else min(total // cell_rows, n // 4)
    if n_cells >= MIN_CELLS:
        return _lazy_cell_greedy(x, n, _partition(x, n_cells, seed), neighbours, progress)
    first = int(torch.randint(total, (1,), generator=torch.Generator().manual_seed(seed)))
    return _greedy_loop(x, n, first, progress)


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
