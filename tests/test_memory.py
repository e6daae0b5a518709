"""Nearest neighbours and the greedy coreset against brute force on real patch features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defectscope.components.features import flatten_patches
from defectscope.components.memory import covering_radius, greedy_coreset, has_faiss, knn
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.errors import ConfigError


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


def plain_greedy(x: torch.Tensor, n: int, first: int) -> list[int]:
    """The textbook farthest-first traversal over every row (float64), as the reference."""
    x = x.double()
    min_d = ((x - x[first]) ** 2).sum(1)
    chosen = [first]
    while len(chosen) < n:
        chosen.append(int(torch.argmax(min_d)))
        min_d = torch.minimum(min_d, ((x - x[chosen[-1]]) ** 2).sum(1))
    return chosen


def test_coreset_is_greedy_farthest_point(real_features: torch.Tensor) -> None:
    x = real_features[:3000]
    chosen = greedy_coreset(x, 40, proj_dim=None, seed=1)
    for k in range(1, 40):  # each new point is the farthest from those before it
        d = torch.cdist(x.double(), x[chosen[:k]].double()).min(1).values
        assert d[chosen[k]] >= d.max() - 1e-5 * d.max()


def test_coreset_covers_better_than_random_and_is_seeded(real_features: torch.Tensor) -> None:
    x = real_features
    n = len(x) // 20
    a = greedy_coreset(x, n, seed=0)
    assert torch.equal(a, greedy_coreset(x, n, seed=0))
    assert not torch.equal(a, greedy_coreset(x, n, seed=1))
    assert len(set(a.tolist())) == n
    rand = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    assert covering_radius(x, a) < 0.8 * covering_radius(x, rand)


@pytest.mark.parametrize(("cell_rows", "neighbours"), [(None, 2), (200, 1), (200, 2), (50, 3)])
def test_lazy_cells_choose_what_the_plain_greedy_chooses(real_features: torch.Tensor, cell_rows: int | None, neighbours: int) -> None:
    """With one cell or many, the compiled lazy loop picks the textbook greedy's centres in
    its order from the same first row (float ties aside), so the covering radius is equal."""
    x = real_features
    n = len(x) // 20
    lazy = greedy_coreset(x, n, seed=3, cell_rows=cell_rows, neighbours=neighbours)
    plain = torch.tensor(plain_greedy(x, n, int(lazy[0])))
    assert (plain == lazy).float().mean() > 0.98
    assert abs(covering_radius(x, lazy) - covering_radius(x, plain)) < 1e-4 * covering_radius(x, plain)


def test_coreset_of_duplicates_and_tiny_inputs() -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [1.0, 1.0]])
    chosen = greedy_coreset(x, 3, cell_rows=1)
    assert covering_radius(x, chosen) == 0.0
    assert torch.equal(greedy_coreset(x, 9), torch.arange(5))


def test_bad_requests() -> None:
    with pytest.raises(ConfigError):
        knn(torch.zeros(2, 3), torch.zeros(0, 3))
    with pytest.raises(ConfigError):
        greedy_coreset(torch.zeros(10, 3), 0)
    with pytest.raises(ConfigError, match="neighbours"):
        greedy_coreset(torch.randn(10, 3), 2, neighbours=0)
