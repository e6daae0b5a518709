"""Approximate banks (faiss HNSW, IVF-PQ): close to exact search, exact distances, saved safely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from defectscope.components.ann import AnnIndex
from defectscope.components.memory import Index
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.errors import ConfigError
from defectscope.evaluation.evaluate import score_records
from defectscope.modelfiles.artifacts import load_detector, save_detector


@pytest.fixture(scope="module")
def weld(battery: Path):
    return load_dataset(battery)


@pytest.fixture(scope="module")
def bank_and_queries(weld) -> tuple[torch.Tensor, torch.Tensor]:
    """Real patch features: the whole bank of 20 training images, queries from 4 test images."""
    det = make_detector("patchcore", coreset_ratio=1.0)
    det.fit(iter_samples(weld.train[:20], det.preprocess))
    q = torch.cat([det.embed(s.image[None]).flatten(2).transpose(1, 2)[0] for s in iter_samples(weld.test[:4], det.preprocess)])
    return det.bank, q


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_search_finds_the_nearest_row_and_measures_it_exactly(kind: str, bank_and_queries) -> None:
    bank, q = bank_and_queries
    exact_d, exact_i = Index(bank).search(q, 1)
    ann = AnnIndex.build(bank, kind)
    d, i = ann.search(q, 3)
    assert (i[:, 0] == exact_i[:, 0]).float().mean() > 0.9
    assert torch.allclose(d, (q[:, None, :] - bank[i]).norm(dim=2), rtol=1e-4, atol=1e-4)  # exact for the rows found
    assert (d[:, 0] >= exact_d[:, 0] * (1 - 1e-4) - 1e-4).all()  # never nearer than the truth (up to rounding)
    assert (d[:, :-1] <= d[:, 1:]).all()
    again = AnnIndex.from_tensor(ann.to_tensor(), bank, kind, ann.params)
    assert torch.equal(again.search(q, 3)[1], i)


def test_patchcore_with_hnsw_round_trips_and_stays_close_to_exact(weld, tmp_path: Path) -> None:
    exact = make_detector("patchcore")
    exact.fit(iter_samples(weld.train, exact.preprocess))
    hnsw = make_detector("patchcore", index="hnsw", index_params={"ef_search": 48})
    hnsw.fit(iter_samples(weld.train, hnsw.preprocess))
    assert torch.equal(exact.bank, hnsw.bank)  # the same coreset, only the search differs
    path = save_detector(hnsw, tmp_path / "hnsw.dscope")
    with safe_open(str(path), framework="pt") as fh:
        assert fh.get_tensor("ann_index").dtype == torch.uint8  # faiss's bytes, no pickle
    loaded = load_detector(path)
    test = weld.test[:24]
    a, b, c = (score_records(d, test).scores for d in (exact, hnsw, loaded))
    assert (b == c).all()
    assert abs(b - a).max() <= 0.02 * abs(a).max()
    grown = loaded.add_normals(iter_samples([r for r in weld.test if r.label][:2], loaded.preprocess))
    assert grown["bank_after"] > grown["bank_before"] and loaded.index.size == grown["bank_after"]  # the index is rebuilt


def test_bad_index_options_are_refused(tmp_path: Path, weld) -> None:
    with pytest.raises(ConfigError, match="Unknown index"):
        make_detector("patchcore", index="annoy")
    with pytest.raises(ConfigError, match="no parameter"):
        make_detector("patchcore", index="hnsw", index_params={"nlist": 4})
    with pytest.raises(ConfigError, match="takes no parameters"):
        make_detector("patchcore", index="flat", index_params={"ef_search": 4})
    det = make_detector("patchcore", index="hnsw")
    det.fit(iter_samples(weld.train[:4], det.preprocess))
    state = det.state()
    del state["ann_index"]
    with pytest.raises(ConfigError, match="holds none"):
        type(det).from_state(det.config(), state)
