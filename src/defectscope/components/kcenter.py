"""Compiled greedy k-center over rows sorted into cells (numba): the coreset's inner loop.

The greedy (Gonzalez's farthest-first traversal, PatchCore Sec. 3.2) repeatedly adds the
row farthest from the chosen centres. Done plainly it reads all N rows per centre. Here
the rows are grouped into cells (`defectscope.components.memory.greedy_coreset` makes them), each row
keeps an *upper bound* on its squared distance to the chosen set (its distance to the
centres applied to its cell so far), and each cell knows its row with the largest bound:

- a new centre is applied at once to its own cell and the ``neighbours - 1`` cells whose
  seeds are nearest to it;
- the row with the largest bound is checked against every centre not yet applied to its
  cell; the centres nearer than its bound are applied to the whole cell in one pass and the
  search repeats; if none is nearer, its bound is its true distance and at least every
  other row's true distance: it is the row the plain greedy would add.

The check reads the chosen centres, which at a 10% coreset is most of the work (about
four checks per centre, each against tens of thousands of centres). It is screened: the
rows arrive rotated onto their principal axes (`memory.principal_axes`; distances are
unchanged), so the first ``LEAD`` columns hold most of the variance (72% for 16 of
magnetic_tile's 128), and the distance over them alone, a lower bound computed for all
centres at once in a vectorised pass over a column-major copy, rules out nearly every
centre before its full distance is read (magnetic_tile, 497k rows, 10%: 56 s before, 22-25 s
with the screen, the same choices; benchmarks/coreset.py).

So the choices are the plain greedy's from the same first row (with one cell the loop *is*
the plain greedy). Distances are summed from float32 differences, never via the
|a|^2 + |b|^2 - 2ab expansion, so a bound and a check of the same pair give the same float
and no tolerance is needed (each (centre, cell) pair is still applied at most once, so the
loop ends even if two code paths rounded differently).

Why compiled: the loop takes tens of thousands of small steps, and in Python each paid
about 100 microseconds of interpreter and dispatch, which made large cells (4k rows) the
only affordable choice; compiled, 512-row cells that stay in the core's cache are best
(magnetic_tile's 497k patches: 18 s before, 6 s now; benchmarks/coreset.py). Single
threaded, so it neither starts nor competes with a thread pool of its own; it releases
the GIL (``nogil``), so independent selections (PatchCore's cross-fitting folds) run on
separate cores from Python threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

FASTMATH = {"reassoc", "contract"}  # lets LLVM vectorise the sums; the order is fixed per build
LEAD = 16  # leading (largest-variance) columns whose partial distance screens the centres in a check


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _sqdist(a: np.ndarray, b: np.ndarray) -> np.float32:
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        t = a[i] - b[i]
        s += t * t
    return s


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _lead_sqdist(a: np.ndarray, lead: np.ndarray, k: int, out: np.ndarray) -> None:
    """out[c] = squared distance from ``a`` to centre c over the leading columns only, for
    c < k: a lower bound on the full distance, vectorised across centres (``lead`` holds
    the columns as rows)."""
    out[:k] = 0.0
    for i in range(lead.shape[0]):
        ai, row = a[i], lead[i]
        for c in range(k):
            t = ai - row[c]
            out[c] += t * t


@njit(cache=True, nogil=True)
def _refresh(min_d: np.ndarray, lo: int, hi: int, j: int, top: np.ndarray, top_at: np.ndarray) -> None:
    """The cell's largest bound and its row."""
    at = lo
    for r in range(lo + 1, hi):
        if min_d[r] > min_d[at]:
            at = r
    top[j], top_at[j] = min_d[at], at


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _apply(
    xs: np.ndarray, offsets: np.ndarray, j: int, centres: np.ndarray, which: np.ndarray, m: int,
    min_d: np.ndarray, top: np.ndarray, top_at: np.ndarray,
) -> None:
    """Cell j's bounds lowered by centres[which[:m]] in one pass over its rows, then its top row."""
    lo, hi = offsets[j], offsets[j + 1]
    if hi == lo:
        return
    for r in range(lo, hi):
        best = min_d[r]
        for q in range(m):
            best = min(best, _sqdist(xs[r], centres[which[q]]))
        min_d[r] = best
    _refresh(min_d, lo, hi, j, top, top_at)


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def start(xs: np.ndarray, offsets: np.ndarray, first: int, min_d: np.ndarray, top: np.ndarray, top_at: np.ndarray) -> None:
    """Bounds from the first centre for every row (exact), and each cell's top row."""
    for r in range(xs.shape[0]):
        min_d[r] = _sqdist(xs[r], xs[first])
    for j in range(offsets.shape[0] - 1):
        if offsets[j + 1] > offsets[j]:
            _refresh(min_d, offsets[j], offsets[j + 1], j, top, top_at)


@njit(cache=True, inline="always")
def _is_applied(applied: np.ndarray, j: int, c: int) -> bool:
    return (applied[j, c >> 6] >> np.uint64(c & 63)) & np.uint64(1) != 0


@njit(cache=True, inline="always")
def _mark_applied(applied: np.ndarray, j: int, c: int) -> None:
    applied[j, c >> 6] |= np.uint64(1) << np.uint64(c & 63)


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def advance(
    xs: np.ndarray,
    offsets: np.ndarray,
    seeds: np.ndarray,
    neighbours: int,
    min_d: np.ndarray,
    top: np.ndarray,
    top_at: np.ndarray,
    centres: np.ndarray,
    chosen: np.ndarray,
    applied: np.ndarray,
    k: int,
    stop: int,
) -> int:
    """Add centres k..stop-1 (see the module docstring); returns stop.

    ``applied``: bit c of row j (uint64 words) says centre c is already in the bounds of
    cell j. Row positions refer to ``xs`` (rows sorted by cell); ``seeds`` are the cells'
    seed rows."""
    n_cells = offsets.shape[0] - 1
    which = np.empty(centres.shape[0], dtype=np.int64)
    partial = np.empty(centres.shape[0], dtype=np.float32)
    lead = np.ascontiguousarray(centres[:, : min(LEAD, centres.shape[1])].T)  # leading columns, one row each
    seed_d = np.empty(n_cells, dtype=np.float32)
    while k < stop:
        j = 0
        for q in range(1, n_cells):
            if top[q] > top[j]:
                j = q
        r = top_at[j]
        _lead_sqdist(xs[r], lead, k, partial)
        m = 0
        for c in range(k):
            if partial[c] < min_d[r] and not _is_applied(applied, j, c) and _sqdist(xs[r], centres[c]) < min_d[r]:
                which[m] = c
                m += 1
        if m > 0:
            for q in range(m):
                _mark_applied(applied, j, which[q])
            _apply(xs, offsets, j, centres, which, m, min_d, top, top_at)
            continue
        chosen[k] = r
        centres[k] = xs[r]
        lead[:, k] = xs[r, : lead.shape[0]]
        which[0] = k
        for q in range(n_cells):
            seed_d[q] = _sqdist(seeds[q], xs[r])
        seed_d[j] = -1.0  # its own cell first
        for _ in range(min(neighbours, n_cells)):
            near = np.argmin(seed_d)
            seed_d[near] = np.inf
            _mark_applied(applied, near, k)
            _apply(xs, offsets, near, centres, which, 1, min_d, top, top_at)
        k += 1
    return k
