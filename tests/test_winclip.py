"""WinCLIP correctness with a tiny random open_clip model (no real weights needed), and a
real-weights check on the real data when open_clip's cache has the paper's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import cached_clip_weights

from defectscope.backbones.clip import CLIPBackbone, get_clip
from defectscope.components.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, prompts
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.errors import ConfigError, WeightsError
from defectscope.modelfiles.artifacts import load_detector, save_detector

TINY = {"clip_model": "defectscope-tiny", "clip_pretrained": "random", "class_name": "tile"}


@pytest.fixture(scope="module")
def tiny() -> CLIPBackbone:
    torch.manual_seed(0)
    return get_clip("defectscope-tiny", "random")


@pytest.fixture(scope="module")
def images(magnetic: Path, tiny: CLIPBackbone) -> torch.Tensor:
    det = make_detector("winclip", **TINY)
    ds = load_dataset(magnetic)
    return torch.stack([s.image for s in iter_samples(ds.test[:3], det.preprocess)])


def test_prompt_ensemble_has_the_papers_sizes() -> None:
    assert len(TEMPLATES) == 22 and len(set(TEMPLATES)) == 22
    assert len(NORMAL_STATES) == 7 and len(ANOMALOUS_STATES) == 4
    normal, anomalous = prompts("metal_nut")
    assert len(normal) == 154 and len(anomalous) == 88
    assert "a photo of the metal nut for visual inspection." in normal
    assert "a cropped photo of a damaged metal nut." in anomalous


@pytest.mark.parametrize("k", [2, 3])
def test_window_embedding_equals_encoder_on_only_that_windows_tokens(tiny: CLIPBackbone, images: torch.Tensor, k: int) -> None:
    """Reference: the full token sequence with an attention mask that lets the class token
    and the window's patches see only each other -- the same as dropping the others."""
    batched = tiny.window_embeddings(images, k)
    tokens = tiny._tokens(images)
    windows = CLIPBackbone.window_index(tiny.grid, k)
    for w in (0, len(windows) // 2, len(windows) - 1):
        keep = torch.zeros(tokens.shape[1], dtype=torch.bool)
        keep[0] = True
        keep[1 + windows[w]] = True
        blocked = ~(keep[:, None] & keep[None, :])
        blocked[~keep, ~keep] = False  # dropped tokens may attend to themselves (no NaN rows)
        additive = torch.zeros(blocked.shape).masked_fill_(blocked, float("-inf"))  # open_clip adds float masks
        out = tiny.clip.visual.transformer(tokens, attn_mask=additive)
        ref = tiny._head(out[:, 0])
        assert torch.allclose(batched[:, w], ref, atol=1e-4)


def test_harmonic_aggregation_matches_direct_computation(tiny: CLIPBackbone) -> None:
    det = make_detector("winclip", **TINY)
    g = tiny.grid
    idx = CLIPBackbone.window_index(g, 3)
    scores = torch.rand(2, idx.shape[0]) * 0.9 + 0.05
    fast = det._to_patches(scores, "win3")
    for p in range(g * g):
        covering = [w for w in range(idx.shape[0]) if p in idx[w].tolist()]
        direct = len(covering) / sum(1.0 / scores[:, w] for w in covering)
        assert torch.allclose(fast[:, p], direct, rtol=1e-5)


def test_scores_are_probabilities_maps_input_size_deterministic(tiny: CLIPBackbone, images: torch.Tensor) -> None:
    det = make_detector("winclip", **TINY).fit(None)
    a, b = det.predict(images), det.predict(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert ((a.scores >= 0) & (a.scores <= 1)).all()
    assert a.maps.shape == (3, *images.shape[-2:])


def test_few_shot_memory_and_model_file(tiny: CLIPBackbone, images: torch.Tensor, tmp_path: Path) -> None:
    from defectscope.data.datasets import Sample

    det = make_detector("winclip", **TINY).fit([Sample(images[0], None, "ref.png")])
    assert det.memory["patch"].shape[0] == tiny.grid**2
    assert det.memory["win2"].shape[0] == (tiny.grid - 1) ** 2
    pred = det.predict(images)
    loaded = load_detector(save_detector(det, tmp_path / "wc.dscope"))
    assert torch.equal(loaded.text, det.text)  # the model file holds the text embeddings
    assert torch.equal(loaded.predict(images).scores, pred.scores)
    zero = make_detector("winclip", **TINY).fit(None)
    assert torch.equal(load_detector(save_detector(zero, tmp_path / "z.dscope")).text, zero.text)


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="square"):
        make_detector("winclip", **TINY, resize="aspect")
    with pytest.raises(ConfigError, match="winclip cannot tile images"):
        make_detector("winclip", **TINY, preprocess={"tile": 64})
    with pytest.raises(WeightsError, match="not found"):
        make_detector("winclip", clip_model="defectscope-tiny", clip_pretrained="/no/such/clip.bin")


def test_real_weights_rank_defective_above_good(magnetic: Path) -> None:
    weights = cached_clip_weights("ViT-B-16-plus-240", "laion400m_e31")
    if weights is None:
        pytest.skip(
            "real CLIP weights not available here: put open_clip_pytorch_model.bin of "
            "timm/vit_base_patch16_plus_clip_240.laion400m_e31 in the Hugging Face cache (or run once online)"
        )
    det = make_detector("winclip", class_name="magnetic tile", clip_pretrained=str(weights))
    ds = load_dataset(magnetic)
    recs = [r for r in ds.test if r.label == 0][:20] + [r for r in ds.test if r.label == 1][:20]
    det.fit(None)
    scores = torch.cat([det.predict(s.image[None]).scores for s in iter_samples(recs, det.preprocess)])
    assert scores[20:].mean() > scores[:20].mean()
