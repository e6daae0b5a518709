"""Approximate nearest neighbours over a memory bank (faiss HNSW and IVF-PQ), saved as bytes.

An `AnnIndex` answers like `memory.Index` (distances and bank indices, nearest first) but
visits only part of the bank: HNSW walks a neighbour graph (``hnsw_m`` links per row,
``ef_search`` candidates kept while searching); IVF-PQ probes ``nprobe`` of ``ivf_lists``
coarse cells and compares product-quantised codes (``pq_m`` bytes per row). The distances
returned are always exact: the ``rerank`` best candidates (IVF-PQ) are re-measured against
the bank's full rows, so an approximate search can only miss the nearest row, never
misstate a distance; HNSW stores full rows and measures them exactly already.

`to_tensor` gives faiss's own binary serialisation as a uint8 tensor, stored inside the
model's safetensors file (no pickle), whose content hash is checked before it is read.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from defectscope.errors import ConfigError

KINDS = ("flat", "hnsw", "ivfpq")
RERANK_ELEMS = 1 << 22  # floats of candidate rows re-measured at once (16 MB)
DEFAULTS: dict[str, dict[str, int]] = {
    "hnsw": {"hnsw_m": 32, "ef_construction": 80, "ef_search": 32},
    "ivfpq": {"ivf_lists": 0, "nprobe": 8, "pq_m": 0, "rerank": 16},  # 0: chosen from the bank's size / dim
}


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError("Approximate search (index=hnsw or ivfpq) needs faiss: pip install faiss-cpu (or defectscope[faiss]).") from exc
    return faiss


def check_params(kind: str, params: dict[str, Any] | None) -> dict[str, int]:
    """The index's parameters with defaults filled in; unknown kinds or keys are refused."""
    if kind not in KINDS:
        raise ConfigError(f"Unknown index {kind!r}; use one of {', '.join(KINDS)}.")
    if kind == "flat":
        if params:
            raise ConfigError(f"index=flat (exact search) takes no parameters, got {sorted(params)}.")
        return {}
    unknown = set(params or {}) - set(DEFAULTS[kind])
    if unknown:
        raise ConfigError(f"index={kind} has no parameter {sorted(unknown)}; it takes {sorted(DEFAULTS[kind])}.")
    out = {**DEFAULTS[kind], **(params or {})}
    if any(not isinstance(v, int) or v < 0 for v in out.values()):
        raise ConfigError(f"index={kind} parameters must be non-negative integers, got {out}.")
    return out


def _pq_m(dim: int) -> int:
    """Sub-quantisers for IVF-PQ: about 4 dims each, a divisor of ``dim``."""
    target = max(1, dim // 4)
    return min((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: (abs(m - target), m))


class AnnIndex:
    """Approximate k-NN over ``bank`` rows (see module docstring)."""

    def __init__(self, bank: torch.Tensor, kind: str, params: dict[str, int], faiss_index: Any) -> None:
        self.bank, self.kind, self.params = bank.float().contiguous(), kind, params
        self.size = bank.shape[0]
        self._index = faiss_index
        self._set_search_params()

    @classmethod
    def build(cls, bank: torch.Tensor, kind: str, params: dict[str, Any] | None = None, *, seed: int = 0) -> AnnIndex:
        faiss = _faiss()
        p = check_params(kind, params)
        if kind == "flat":
            raise ConfigError("index=flat is exact search: use memory.Index.")
        x = np.ascontiguousarray(bank.float().numpy())
        n, d = x.shape
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p["hnsw_m"])
            index.hnsw.efConstruction = p["ef_construction"]
        else:
            p["ivf_lists"] = p["ivf_lists"] or max(1, min(int(4 * math.sqrt(n)), n // 39))
            p["pq_m"] = p["pq_m"] or _pq_m(d)
            if d % p["pq_m"]:
                raise ConfigError(f"pq_m={p['pq_m']} must divide the feature size {d}.")
            nbits = max(1, min(8, int(math.log2(max(2, n // 39)))))  # faiss wants >= 39 rows per code
            index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, p["ivf_lists"], p["pq_m"], nbits)
            index.cp.seed = index.pq.cp.seed = seed
            index.train(x)
        index.add(x)
        return cls(bank, kind, p, index)

    @classmethod
    def from_tensor(cls, data: torch.Tensor, bank: torch.Tensor, kind: str, params: dict[str, int]) -> AnnIndex:
        faiss = _faiss()
        index = faiss.deserialize_index(np.ascontiguousarray(data.numpy()))
        if index.ntotal != bank.shape[0] or index.d != bank.shape[1]:
            raise ConfigError(f"The saved {kind} index holds {index.ntotal} rows of {index.d} dims, the bank {tuple(bank.shape)}; refit.")
        return cls(bank, kind, params, index)

    def to_tensor(self) -> torch.Tensor:
        return torch.from_numpy(_faiss().serialize_index(self._index).copy())

    def _set_search_params(self) -> None:
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = self.params["ef_search"]
        else:
            self._index.nprobe = self.params["nprobe"]

    def nbytes(self) -> int:
        """Bytes of the serialised index (for HNSW this includes the full rows)."""
        return int(self.to_tensor().numel())

    def nearest_distances(self, query: torch.Tensor) -> torch.Tensor:
        """Distance of each query row to the nearest bank row found (Q)."""
        return self.search(query, 1)[0][:, 0]

    def search(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, indices), both Q x k, nearest first; distances exact for the rows found."""
        k = min(k, self.size)
        q = np.ascontiguousarray(query.float().numpy())
        wide = k if self.kind == "hnsw" else min(self.size, max(k, self.params["rerank"]))
        d, i = self._index.search(q, wide)
        idx = torch.from_numpy(i).long()
        missing = idx < 0  # fewer candidates than asked (a sparse probe): never chosen
        if self.kind == "hnsw" and not missing.any():
            return torch.from_numpy(d).clamp_(min=0).sqrt_(), idx
        safe = idx.clamp(min=0)
        query = query.float()
        dist, best = torch.empty(q.shape[0], k), torch.empty(q.shape[0], k, dtype=torch.long)
        step = max(1, RERANK_ELEMS // (wide * self.bank.shape[1]))
        for s in range(0, q.shape[0], step):  # re-measure candidates in chunks: Q x wide x D floats at once is big
            exact = (query[s : s + step, None, :] - self.bank[safe[s : s + step]]).norm(dim=2)
            exact[missing[s : s + step]] = float("inf")
            dist[s : s + step], pos = exact.topk(k, dim=1, largest=False)
            best[s : s + step] = safe[s : s + step].gather(1, pos)
        return dist, best
