"""AnomalyCLIP correctness with a tiny random open_clip model on real images, and a
real-weights check that runs when the paper's CLIP is in open_clip's cache or a named file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cached_clip_weights
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from defectscope.backbones.clip import get_clip, vv_attention
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.detectors.anomalyclip import read_prompts
from defectscope.detectors.anomalyclip_training import anomalyclip_loss, train_prompts
from defectscope.errors import ConfigError, DataError, ModelFileError, WeightsError
from defectscope.modelfiles.artifacts import load_detector, save_detector
from defectscope.synthesis.split import make_synthetic_split

TINY = {"clip_model": "defectscope-tiny", "clip_pretrained": "random", "image_size": 96, "depth": 3}


def synthetic_split(data: Path, out: Path, normals: Path) -> Path:
    """A synthetic split of 24 real normal images of ``data``: 8 Perlin + 8 CutPaste defects."""
    good = sorted((data / "train" / "good").iterdir())[:24]
    (normals / "train" / "good").mkdir(parents=True)
    for f in good:
        (normals / "train" / "good" / f.name).symlink_to(f)
    make_synthetic_split(normals, out, kinds=("perlin", "cutpaste"), n=8, seed=0)
    return out


@pytest.fixture(scope="module")
def aux(magnetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_split(magnetic, tmp_path_factory.mktemp("aux") / "magnetic_synth", tmp_path_factory.mktemp("normals"))


@pytest.fixture(scope="module")
def battery_aux(battery: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_split(battery, tmp_path_factory.mktemp("aux") / "battery_synth", tmp_path_factory.mktemp("normals"))


@pytest.fixture(scope="module")
def images(magnetic: Path) -> torch.Tensor:
    det = make_detector("anomalyclip", **TINY, prompts="untrained")
    recs = load_dataset(magnetic).test[:3]
    return torch.stack([s.image for s in iter_samples(recs, det.preprocess)])


def reference_vv(attn: torch.nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """V-V attention written out head by head from the packed projection weights."""
    c = x.shape[-1]
    heads = attn.num_heads
    d = c // heads
    v = x @ attn.in_proj_weight[2 * c :].T + attn.in_proj_bias[2 * c :]
    outs = []
    for h in range(heads):
        vh = v[..., h * d : (h + 1) * d]
        weights = torch.softmax(vh @ vh.transpose(-1, -2) / math.sqrt(d), dim=-1)
        outs.append(weights @ vh)
    return torch.cat(outs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias


def test_dpam_equals_reference_vv_attention_and_leaves_the_global_embedding(images: torch.Tensor) -> None:
    clip = get_clip("defectscope-tiny", "random")
    blocks = clip.clip.visual.transformer.resblocks
    with torch.no_grad():
        x = clip._tokens(images)
        assert torch.allclose(vv_attention(blocks[1].attn, blocks[1].ln_1(x)), reference_vv(blocks[1].attn, blocks[1].ln_1(x)), atol=1e-5)
        image, patches = clip.dpam_encode(images, layers=(1, 2, 4), dpam_from=2)
        own = clip.clip.encode_image((images - clip.mean) / clip.std)  # open_clip's own forward
        assert torch.allclose(image, own, atol=1e-5)
        # the two-path recurrence, written independently: block 1 plain; from block 2 on the
        # V-V path adds V-V attention of the original path's normalised tokens and skips the MLP
        t = x
        t = blocks[0](t)
        after1 = t
        vv = t + reference_vv(blocks[1].attn, blocks[1].ln_1(t))
        t = blocks[1](t)
        after2 = vv
        for b in blocks[2:]:
            vv = vv + reference_vv(b.attn, b.ln_1(t))
            t = b(t)
        expected = [after1, after2, vv]
    for got, want in zip(patches, expected, strict=True):
        assert torch.allclose(got, clip._head(want[:, 1:]), atol=1e-4)
    assert not torch.allclose(patches[2], clip._head(t[:, 1:]), atol=1e-3)  # DPAM changes the patch tokens


def test_learned_text_encoder_without_learned_tokens_is_clip_text_encoder() -> None:
    """With depth 1 (no deep tokens) and the placeholders' own embeddings as context, the
    learned-text path is exactly open_clip's encode_text of the placeholder prompts."""
    clip = get_clip("defectscope-tiny", "random")
    ids = clip.tokenizer(["X X X object.", "X X X damaged object."])
    with torch.no_grad():
        embeds = clip.clip.token_embedding(ids)
        ours = clip.encode_learned_text(embeds, ids.argmax(-1), torch.zeros(0, 4, embeds.shape[-1]))
        assert torch.allclose(ours, clip.clip.encode_text(ids), atol=1e-5)


def test_deep_tokens_replace_positions_one_to_t_before_blocks_one_to_k() -> None:
    """Reference: open_clip's own text forward with pre-hooks that overwrite positions 1..T
    of the input of text blocks 1..K (0-based) with the deep tokens."""
    clip = get_clip("defectscope-tiny", "random")
    ids = clip.tokenizer(["X X X X X object.", "X X X X X damaged object."])
    deep = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    blocks = clip.clip.transformer.resblocks

    def replace(k: int):
        def hook(module, args, kwargs):
            x = args[0].clone()
            x[:, 1:4] = deep[k - 1]
            return (x, *args[1:]), kwargs

        return hook

    handles = [blocks[k].register_forward_pre_hook(replace(k), with_kwargs=True) for k in (1, 2)]
    try:
        with torch.no_grad():
            want = clip.clip.encode_text(ids)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        got = clip.encode_learned_text(clip.clip.token_embedding(ids), ids.argmax(-1), deep)
        plain = clip.clip.encode_text(ids)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)


def hand_focal(probs: np.ndarray, mask: np.ndarray) -> float:
    total, count = 0.0, 0
    for n in range(probs.shape[0]):
        for i in range(probs.shape[2]):
            for j in range(probs.shape[3]):
                target = int(mask[n, i, j])
                onehot = [min(max(1.0 if c == target else 0.0, 1e-5), 1 - 1e-5) for c in range(2)]
                pt = onehot[0] * probs[n, 0, i, j] + onehot[1] * probs[n, 1, i, j] + 1e-5
                total += -((1 - pt) ** 2) * math.log(pt)
                count += 1
    return total / count


def hand_dice(pred: np.ndarray, target: np.ndarray) -> float:
    scores = [(2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1) for p, t in zip(pred, target, strict=True)]
    return 1 - sum(scores) / len(scores)


def test_loss_matches_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.functional.normalize
    text = norm(torch.randn(2, 8, generator=g), dim=-1)
    image = norm(torch.randn(2, 8, generator=g), dim=-1)
    patches = [norm(torch.randn(2, 4, 8, generator=g), dim=-1) for _ in range(2)]  # 2 x 2 grids
    masks = torch.zeros(2, 4, 4)
    masks[1, :2, 1:3] = 1
    labels = torch.tensor([0, 1])
    total, parts = anomalyclip_loss(text, image, patches, masks, labels)
    logits = (image @ text.T / 0.07).numpy()
    ce = np.mean([np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, labels.numpy(), strict=True)])
    local = 0.0
    for p in patches:
        probs = torch.softmax(p @ text.T / 0.07, dim=-1).transpose(1, 2).reshape(2, 2, 2, 2)
        up = torch.nn.functional.interpolate(probs, size=(4, 4), mode="bilinear", align_corners=False).numpy()
        local += hand_focal(up, masks.numpy()) + hand_dice(up[:, 1], masks.numpy()) + hand_dice(up[:, 0], 1 - masks.numpy())
    assert parts["global"] == pytest.approx(ce, rel=1e-5)
    assert parts["local"] == pytest.approx(local, rel=1e-5)
    assert float(total) == pytest.approx(ce + 4 * local, rel=1e-5)


def test_training_moves_only_the_learned_tokens_and_is_seeded(aux: Path, tmp_path: Path) -> None:
    clip = get_clip("defectscope-tiny", "random")
    before = {k: v.clone() for k, v in clip.clip.state_dict().items()}
    a = train_prompts([aux], tmp_path / "a.dscope", options=TINY, epochs=2, batch_size=8)
    b = train_prompts([aux], tmp_path / "b.dscope", options=TINY, epochs=2, batch_size=8)
    after = clip.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # CLIP bit-identical
    assert all(not p.requires_grad for p in clip.clip.parameters())
    assert a["losses"] == b["losses"] and len(a["losses"]) == 2 * math.ceil(a["images"] / 8)
    _, ta = read_prompts(tmp_path / "a.dscope")
    _, tb = read_prompts(tmp_path / "b.dscope")
    untrained = make_detector("anomalyclip", **TINY, prompts="untrained").learner.learned()
    assert set(ta) == {"normal", "anomalous", "deep"}
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert all(not torch.equal(ta[k], untrained[k]) for k in ta)  # every learned tensor moved
    assert ta["normal"].shape == (12, 32) and ta["deep"].shape == (2, 4, 32)
    assert (tmp_path / "a.loss.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="already exists"):
        train_prompts([aux], tmp_path / "a.dscope", options=TINY, epochs=1)


def test_prompts_file_round_trip_model_file_and_refusals(aux: Path, images: torch.Tensor, tmp_path: Path) -> None:
    path = tmp_path / "p.dscope"
    train_prompts([aux], path, options=TINY, epochs=1, batch_size=8)
    manifest, _ = read_prompts(path)
    assert manifest["clip_model"] == "defectscope-tiny" and manifest["setup"]["image_size"] == 96
    det = make_detector("anomalyclip", prompts=str(path)).fit(None)  # the rest comes from the file
    assert det.image_size == 96 and det.depth == 3
    first = det.predict(images)
    again = make_detector("anomalyclip", prompts=str(path)).fit(None).predict(images)
    assert torch.equal(first.scores, again.scores) and torch.equal(first.maps, again.maps)
    assert first.maps.shape == (3, 96, 96) and ((first.scores > 0) & (first.scores < 1)).all()
    loaded = load_detector(save_detector(det, tmp_path / "m.dscope"))
    second = loaded.predict(images)
    assert torch.equal(first.scores, second.scores) and torch.equal(first.maps, second.maps)

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    tensors["normal"][0, 0] += 1
    save_file(tensors, tmp_path / "tampered.dscope", metadata=meta)
    with pytest.raises(ModelFileError, match="modified"):
        make_detector("anomalyclip", prompts=str(tmp_path / "tampered.dscope"))
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in get_clip("defectscope-tiny", "random").clip.state_dict().items()}
    torch.save(other, tmp_path / "other_clip.pt")
    with pytest.raises(ModelFileError, match="hashes to"):
        make_detector("anomalyclip", prompts=str(path), clip_pretrained=str(tmp_path / "other_clip.pt")).fit(None)
    meta_json = json.loads(meta["manifest"])
    assert meta_json["format"] == "defectscope-prompts" and "training" in meta_json


def test_clear_errors(aux: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs learned prompts"):
        make_detector("anomalyclip", **TINY).fit(None)
    with pytest.raises(ModelFileError, match="Prompts file not found"):
        make_detector("anomalyclip", **TINY, prompts=str(tmp_path / "none.dscope"))
    with pytest.raises(ConfigError, match="cannot tile"):
        make_detector("anomalyclip", **TINY, prompts="untrained", preprocess={"tile": 64})
    with pytest.raises(ConfigError, match="multiple of"):
        make_detector("anomalyclip", **{**TINY, "image_size": 100}, prompts="untrained")
    with pytest.raises(DataError, match="no defective test images"):
        good_only = tmp_path / "good_only"
        (good_only / "train" / "good").mkdir(parents=True)
        (good_only / "test" / "good").mkdir(parents=True)
        for f in sorted((aux / "test" / "good").iterdir())[:2]:
            (good_only / "test" / "good" / f.name).symlink_to(f)
            (good_only / "train" / "good" / f.name).symlink_to(f)
        train_prompts([good_only], tmp_path / "x.dscope", options=TINY, epochs=1)


def test_an_unreadable_auxiliary_image_is_skipped_not_fatal(aux: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file whose header reads but whose pixels do not (truncated) is skipped with a
    warning naming it; training goes on with the rest."""
    copy = tmp_path / "aux"
    for f in aux.rglob("*"):
        if f.is_file():
            (copy / f.relative_to(aux)).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(aux)).symlink_to(f)
    victim = min((copy / "test" / "good").iterdir())
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[: len(data) // 3])
    with caplog.at_level("WARNING", logger="defectscope"):
        summary = train_prompts([copy], tmp_path / "p.dscope", options=TINY, epochs=1, batch_size=8)
    assert summary["skipped"] == [str(victim)] and str(victim) in caplog.text
    assert summary["images"] == len(load_dataset(aux).test) - 1


def pixel_aurocs(opts: dict, learned: Path, recs: list) -> dict[str, float]:
    """Pixel AUROC of the untrained and the learned prompts on ``recs``."""
    aurocs = {}
    for prompts in ("untrained", str(learned)):
        det = make_detector("anomalyclip", **opts, prompts=prompts).fit(None)
        maps, masks = [], []
        for s in iter_samples(recs, det.preprocess):
            maps.append(det.predict(s.image[None]).maps[0].flatten())
            masks.append((s.mask if s.mask is not None else torch.zeros(s.image.shape[-2:], dtype=torch.bool)).flatten())
        aurocs["learned" if prompts == str(learned) else prompts] = roc_auc_score(torch.cat(masks).numpy(), torch.cat(maps).numpy())
    return aurocs


def test_dinov2_image_tower_is_the_vit_backbone(images: torch.Tensor) -> None:
    """The half-real CLIP's image tower (DINOv2 blocks 1-8 copied into open_clip) gives the
    same tokens as `ViTBackbone`, the module checked against onnxruntime, on real images."""
    from defectscope.backbones.vit import get_vit

    clip = get_clip("defectscope-dinov2", "dinov2")
    x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ours = clip.clip.visual.transformer(clip._tokens(x))
        vit = get_vit((8,), "auto")
        ref = vit.tokens((x - vit.mean) / vit.std)[-1]
    assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()
    with pytest.raises(WeightsError, match="defectscope-dinov2"):
        get_clip("defectscope-tiny", "dinov2")


def test_prompts_learned_on_real_image_features_transfer(aux: Path, battery_aux: Path, tmp_path: Path) -> None:
    """With real image features (DINOv2 tower, random text tower), prompts learned on
    synthetic magnetic_tile defects localise synthetic defects on battery_weld images, a
    product they never saw, better than the initial prompts (the paper's protocol, minus
    CLIP's image-text alignment)."""
    opts = {"clip_model": "defectscope-dinov2", "clip_pretrained": "dinov2", "image_size": 224, "depth": 3}
    train_prompts([aux], tmp_path / "dino.dscope", options=opts, epochs=5, batch_size=8)
    recs = load_dataset(battery_aux).test
    aurocs = pixel_aurocs(opts, tmp_path / "dino.dscope", recs)
    assert aurocs["learned"] > aurocs["untrained"] + 0.1, aurocs


def test_real_weights_learned_prompts_beat_untrained(aux: Path, battery: Path, tmp_path: Path) -> None:
    """With the paper's CLIP: one epoch on the synthetic magnetic_tile split, then the
    battery_weld test images: learned prompts localise better than the initial ones."""
    weights = cached_clip_weights("ViT-L-14-336-quickgelu", "openai", env="DEFECTSCOPE_CLIP_VITL14_336")
    if weights is None:
        pytest.skip(
            "real CLIP weights not available here: put ViT-L-14-336px.pt (OpenAI) in ~/.cache/clip/, or "
            "open_clip_pytorch_model.bin of timm/vit_large_patch14_clip_336.openai in the Hugging Face cache, "
            "or name the file in DEFECTSCOPE_CLIP_VITL14_336"
        )
    opts = {"clip_model": "ViT-L-14-336-quickgelu", "clip_pretrained": str(weights), "image_size": 336}
    train_prompts([aux], tmp_path / "real.dscope", options=opts, epochs=1, batch_size=8)
    test = load_dataset(battery).test
    recs = [r for r in test if r.label == 1][:10] + [r for r in test if r.label == 0][:10]
    aurocs = pixel_aurocs(opts, tmp_path / "real.dscope", recs)
    assert aurocs["learned"] > aurocs["untrained"], aurocs


def test_cli_train_prompts_then_evaluate(aux: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from defectscope.cli import app

    runner = CliRunner()
    out = tmp_path / "cli.dscope"
    r = runner.invoke(app, ["train-prompts", str(aux), "-o", str(out), "--clip", "defectscope-tiny", "--pretrained", "random", "--epochs", "1", "--set", "image_size=96", "--set", "depth=3"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and out.with_suffix(".loss.png").is_file()
    r = runner.invoke(app, ["evaluate", str(aux), "--method", "anomalyclip", "--set", f"prompts={out}"])
    assert r.exit_code == 0, r.output
    assert "| overall |" in r.output
    r = runner.invoke(app, ["train-prompts", str(aux), "-o", str(out), "--clip", "defectscope-tiny", "--pretrained", "random"])
    assert r.exit_code == 2 and "already exists" in r.output
