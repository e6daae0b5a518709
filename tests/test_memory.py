"""Nearest neighbours and the greedy coreset against brute force on real patch features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.errors import ConfigError
from defectscope.features import flatten_patches
from defectscope.memory import _lazy_cell_greedy, _partition, covering_radius, greedy_coreset, has_faiss, knn


@pytest.fixture(scope="module")
def real_features(battery: Path) -> torch.Tensor:
    det = make_detector("patchcore")
    ds = load_dataset(battery)
    return torch.cat([flatten_patches(det.embed(s.image[None])) for s in iter_samples(ds.train[:3], det.preprocess)])


def test_knn_matches_brute_force_across_chunks(real_features: torch.Tensor) -> None:
    bank, query = real_features[::3], real_features[1::3][::2]
    ref = torch.cdist(query.double(), bank.double()).topk(4, largest=False)
    d, i = knn(query, bank, 4, max_elems=5000)  # forces many query and bank chunks
    assert torch.equal(i, ref.indices)
    assert torch.allclose(d.double(), ref.values, atol=1e-3)


@pytest.mark.skipif(not has_faiss(), reason="faiss-cpu not installed")
def test_faiss_agrees_with_torch(real_features: torch.Tensor) -> None:
    bank, query = real_features[::3], real_features[1::3][::2]
    d1, i1 = knn(query, bank, 3, backend="torch")
    d2, i2 = knn(query, bank, 3, backend="faiss")
    assert (i1 == i2).float().mean() > 0.99
    assert torch.allclose(d1, d2, atol=1e-2)


def test_coreset_is_greedy_farthest_point(real_features: torch.Tensor) -> None:
    x = real_features[:3000]
    chosen = greedy_coreset(x, 40, proj_dim=None, precision="float32", seed=1)
    for k in range(1, 40):  # each new point is the farthest from those before it
        d = torch.cdist(x.double(), x[chosen[:k]].double()).min(1).values
        assert d[chosen[k]] >= d.max() - 1e-3 * d.max()


def test_coreset_covers_better_than_random_and_is_seeded(real_features: torch.Tensor) -> None:
    x = real_features
    n = len(x) // 20
    a = greedy_coreset(x, n, seed=0)
    assert torch.equal(a, greedy_coreset(x, n, seed=0))
    assert not torch.equal(a, greedy_coreset(x, n, seed=1))
    assert len(set(a.tolist())) == n
    rand = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    assert covering_radius(x, a) < 0.8 * covering_radius(x, rand)
    exact = greedy_coreset(x, n, seed=0, precision="float32")
    assert covering_radius(x, a) < 1.1 * covering_radius(x, exact)


def test_lazy_cells_choose_what_the_plain_greedy_loop_chooses(real_features: torch.Tensor) -> None:
    """The lazy cell greedy is exact: started from the same seed rows, the plain loop over
    all rows picks the same centres in the same order (float32, so no rounding ties)."""
    x = real_features
    n, n_cells = len(x) // 20, 24
    cells = _partition(x, n_cells, seed=3)
    lazy = _lazy_cell_greedy(x, n, cells, neighbours=2, progress=None)
    seeds = cells.order[cells.seeds]
    min_d = torch.cdist(x, x[seeds]).min(1).values ** 2
    d = torch.empty(len(x))
    plain = seeds.tolist()
    while len(plain) < n:
        plain.append(int(torch.argmax(min_d)))
        torch.minimum(min_d, ((x - x[plain[-1]]) ** 2).sum(1), out=d)
        min_d = d.clone()
    assert lazy.tolist()[:n_cells] == plain[:n_cells]
    assert (torch.tensor(plain) == lazy).float().mean() > 0.98  # float ties aside
    assert abs(covering_radius(x, lazy) - covering_radius(x, torch.tensor(plain))) < 1e-3 * covering_radius(x, lazy)
    auto = greedy_coreset(x, n, cell_rows=len(x) // 16)  # 16 cells: the lazy path
    assert covering_radius(x, auto) < 1.02 * covering_radius(x, greedy_coreset(x, n, cell_rows=None))


def test_bad_requests() -> None:
    with pytest.raises(ConfigError):
        knn(torch.zeros(2, 3), torch.zeros(0, 3))
    with pytest.raises(ConfigError):
        greedy_coreset(torch.zeros(10, 3), 0)
    with pytest.raises(ConfigError, match="precision"):
        greedy_coreset(torch.randn(10, 3), 2, precision="float16")
