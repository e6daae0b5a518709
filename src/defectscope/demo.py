"""`defectscope demo`: the whole job on the bundled battery-weld sample, written to a folder.

Evaluates the method (metric table, report.html), fits a model file with a threshold from
the normal training images (each scored as unseen), and scores a few test images into
heatmaps, then writes report.md.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from rich.console import Console

from defectscope import pipeline
from defectscope.data.datasets import load_dataset
from defectscope.decision.thresholds import DEFAULT_FALSE_ALARM_RATE
from defectscope.detectors.base import make_detector
from defectscope.engines.local import predict_folder
from defectscope.evaluation.evaluate import evaluate
from defectscope.evaluation.report import html_report
from defectscope.modelfiles.artifacts import read_manifest, save_detector

SAMPLE = Path(__file__).parent / "sample_data" / "battery_weld"


def fresh_folder(out: Path) -> Path:
    """``out`` if it is new or empty, else ``out-2``, ``out-3``, ...: nothing gets overwritten."""
    candidate, n = out, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = out.with_name(f"{out.name}-{n}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def run_demo(
    out: Path, method: str, console: Console, progress: Callable[[], AbstractContextManager[Any]]
) -> Path:
    out = fresh_folder(out)
    console.print(f"demo: {method} on the bundled battery-weld sample ({SAMPLE}) -> {out}")
    dataset = load_dataset(SAMPLE)  # indexed once: its warnings (40 orphan masks) are said once
    with progress() as report:
        result = evaluate(method, dataset, false_alarm_rate=DEFAULT_FALSE_ALARM_RATE, keep_scores=True, progress=report)
        fitted = pipeline.fit(make_detector(method), dataset.train, progress=report)
    model = save_detector(fitted.detector, out / "model.dscope", extra=fitted.extra())
    model_id = read_manifest(model)["sha256"]
    page = html_report(result, out / "report.html")
    test = dataset.test
    chosen = [r.path for r in test if r.label == 0][:3] + [r.path for r in test if r.label == 1][:3]
    thr = fitted.threshold.value if fitted.threshold else None
    with progress() as report:
        rows = predict_folder(
            fitted.detector, chosen, out / "predictions", judge=fitted.judge(), model_id=model_id, map_range=fitted.map_range, progress=report
        ).rows
    lines = [
        "# defectscope demo",
        "",
        result.to_markdown(),
        f"Model file: `{model}`; threshold: "
        + (f"{thr:.4g} ({fitted.threshold.method})" if fitted.threshold else "none"),
        "",
        "| image | score | verdict |",
        "|---|---|---|",
        *[f"| {Path(r['path']).name} | {'-' if r['score'] is None else format(r['score'], '.3f')} | {r['verdict']} |" for r in rows],
        "",
        f"Heatmaps: `{out / 'predictions'}`; report with curves, histograms and the worst cases: `{page}`",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "metrics.json").write_text(result.to_json())
    print("\n".join(lines))  # noqa: T201 - the demo's report is its output
    return out
