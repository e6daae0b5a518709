"""Answers in words from the anomaly map: real images, and a language model that is checked."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers import defect_crop
from PIL import Image
from typer.testing import CliRunner

from defectscope import pipeline
from defectscope.cli import app
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.decision.answers import LocalSmolLM2, OpenAIEndpoint, answer, ask, contradiction, rule_answer
from defectscope.decision.explain import Finding, Region, make_finding
from defectscope.decision.scoring import Judge
from defectscope.detectors import make_detector
from defectscope.errors import ConfigError
from defectscope.modelfiles.artifacts import save_detector

CELLS = {"top left": (0.08, 0.08), "bottom right": (0.75, 0.75), "middle right": (0.42, 0.75)}  # (row, col) of the patch corner


@pytest.fixture(scope="module")
def weld(battery: Path, tmp_path_factory):
    """PatchCore fitted on 12 good welds, its threshold, a good test image and a real defect crop."""
    ds = load_dataset(battery)
    fitted = pipeline.fit(make_detector("patchcore", coreset_ratio=0.1), ds.train[:12])
    det = fitted.detector
    crop = defect_crop(list(iter_samples([r for r in ds.test if r.label][:10], det.preprocess)))
    good = next(r for r in ds.test if r.label == 0)
    model = save_detector(det, tmp_path_factory.mktemp("answers") / "weld.dscope", extra=fitted.extra())
    return det, fitted.threshold.value, good, crop, model


def pasted_image(good_path: Path, crop, cell: tuple[float, float], out: Path) -> Path:
    """The good image with the defect crop (at most a fifth of each side) pasted at ``cell``."""
    img = np.asarray(Image.open(good_path).convert("RGB")).copy()
    h, w = img.shape[:2]
    patch = (crop.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    patch = np.asarray(Image.fromarray(patch).resize((max(8, w // 5), max(8, h // 5))))
    y, x = int(cell[0] * h), int(cell[1] * w)
    img[y : y + patch.shape[0], x : x + patch.shape[1]] = patch
    Image.fromarray(img).save(out)
    return out


@pytest.mark.parametrize("where", list(CELLS))
def test_pasted_defect_is_answered_yes_at_its_grid_cell(weld, where: str, tmp_path: Path) -> None:
    det, thr, good, crop, _ = weld
    image = pasted_image(good.path, crop, CELLS[where], tmp_path / "pasted.png")
    result = ask(det, image, "Is there an anomaly in this image?", judge=Judge(thr))
    assert result.finding["defective"], result.finding["score"]
    assert result.finding["regions"][0]["position"] == where
    assert result.text.startswith("Yes") and where in result.text
    assert where in ask(det, image, "where is it?", judge=Judge(thr)).text


def test_normal_image_is_answered_no(weld) -> None:
    det, thr, good, _, _ = weld
    result = ask(det, good.path, judge=Judge(thr))
    assert result.finding["defective"] is False and result.text.startswith("No.")
    assert "below the threshold" in ask(det, good.path, "how sure are you?", judge=Judge(thr)).text


def finding_at(position: str, kind: str | None = None) -> Finding:
    region = Region(10, 10, 20, 5, 80, 0.01, 3.0, position, elongation=4.0, kind=kind, kind_similarity=0.9 if kind else None)
    return Finding(3.0, 2.0, True, "moderately", [region])


def test_rule_answers_to_free_questions() -> None:
    f = finding_at("bottom left", "crack")
    assert rule_answer(f, "Is there an anomaly?", ["crack", "blowhole"]) == "Yes, the part is moderately anomalous at the bottom left, most like a crack."
    assert "elongated, like a line" in rule_answer(f, "how big is it?")
    assert rule_answer(f, "is it a blowhole?", ["crack", "blowhole"]) == "No, it looks more like a crack than a blowhole."
    assert "1.50 times the threshold" in rule_answer(f, "how sure are you?")
    assert "cannot name its kind" in rule_answer(finding_at("centre"), "what kind of defect is it?")
    assert "no decision threshold" in rule_answer(Finding(1.0, None, None, None, []))


@pytest.mark.parametrize(
    "text, contradicts",
    [
        ("No, the part looks normal.", True),
        ("There is no defect in this image.", True),
        ("Yes, there is a crack at the top right.", True),
        ("Yes, a blowhole at the bottom left.", True),
        ("Yes, a crack at the bottom left of the part.", False),
        ("The part is moderately anomalous in its lower left.", False),
    ],
)
def test_contradictions_are_caught(text: str, contradicts: bool) -> None:
    assert (contradiction(text, finding_at("bottom left", "crack"), ["crack", "blowhole"]) is not None) == contradicts


class _Stub(BaseHTTPRequestHandler):
    reply = ""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["messages"][0]["role"] == "system"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": type(self).reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_a_contradicting_model_answer_is_replaced_by_the_rule_answer(stub_server: str) -> None:
    finding = finding_at("bottom right")
    _Stub.reply = "No, the part looks normal."
    result = answer(finding, "Is there an anomaly?", llm=OpenAIEndpoint(stub_server))
    assert result.source == "rules" and result.text == result.rule_text
    assert result.llm_text == "No, the part looks normal." and "no anomaly" in result.llm_rejected
    _Stub.reply = "Yes: the part is moderately anomalous, at the bottom right."
    result = answer(finding, "Is there an anomaly?", llm=OpenAIEndpoint(stub_server))
    assert result.source == "llm" and result.text == _Stub.reply and result.llm_rejected is None


def test_unreachable_endpoint_or_missing_weights_give_the_rule_answer_with_a_reason(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    result = answer(finding_at("centre"), llm=OpenAIEndpoint(f"http://127.0.0.1:{port}", timeout=2))
    assert result.source == "rules" and "cannot be reached" in result.llm_rejected
    with pytest.raises(ConfigError, match="Cannot load the language model"):
        LocalSmolLM2(tmp_path / "missing.gguf")


def test_cli_ask_json_carries_both_answers(weld, tmp_path: Path, stub_server: str) -> None:
    _, _, good, _, model = weld
    _Stub.reply = "Yes, there is a defect at the top left."
    result = CliRunner().invoke(app, ["ask", str(model), str(good.path), "Is there an anomaly?", "--json", "--llm", stub_server])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{") :])
    assert out["source"] == "rules" and out["finding"]["defective"] is False
    assert out["llm_text"] == _Stub.reply and "score is below the threshold" in out["llm_rejected"]


def test_make_finding_without_regions_above_threshold_still_locates_the_peak() -> None:
    amap = np.zeros((90, 90), np.float32)
    amap[70:80, 5:15] = 1.5  # peak below the threshold 2.0 (a smoothed map), image score above
    finding = make_finding(2.5, amap, 2.0)
    assert finding.defective and finding.regions[0].position == "bottom left"


def test_cli_ask_with_missing_model_weights_answers_by_rules_and_says_why(weld, tmp_path: Path) -> None:
    _, _, good, _, model = weld
    result = CliRunner().invoke(app, ["ask", str(model), str(good.path), "--json", "--llm", str(tmp_path / "none.gguf")])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{") :])
    assert out["source"] == "rules" and "Cannot load the language model" in out["llm_rejected"]


def test_elongation_tells_a_line_from_a_blob() -> None:
    from defectscope.decision.explain import find_regions

    amap = np.zeros((60, 60), np.float32)
    amap[10, 5:45] = 1.0  # a one-pixel crack
    amap[30:40, 30:40] = 1.0  # a square blob
    line, blob = sorted(find_regions(amap, 0.5), key=lambda r: r.height)
    assert line.elongation > 10 and blob.elongation == pytest.approx(1.0)
