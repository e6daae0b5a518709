"""Detector x dataset -> a metric table per defect type and overall, with cost figures.

Metrics are computed at the network input resolution (for tiled models, the scaled image
size; ``metric_size`` caps the long side), on the part of each map that shows the image
(letterbox padding excluded); masks are resized with centre-aligned nearest neighbours,
so they sit where the resized image shows the defect.
"""

from __future__ import annotations

import csv
import io
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from defectscope.data.datasets import Dataset, Record, iter_samples, load_dataset
from defectscope.data.fewshot import sample_shots
from defectscope.data.images import Geometry, Preprocess, crop_content
from defectscope.data.tiles import training_samples
from defectscope.decision.metrics import image_metrics, misclassified, pixel_metrics
from defectscope.decision.scoring import Judge, score_samples
from defectscope.decision.thresholds import Threshold, from_normal
from defectscope.decision.verdict import Verdict
from defectscope.detectors.base import Detector, Progress, fewshot_options, make_detector, training_options
from defectscope.errors import ConfigError, DataError

# tpr_at_fpr1/5: the share of defective images the best threshold catches while flagging at
# most 1% / 5% of the good ones (threshold-free, from the test ROC): the operating point a
# line runs at, which AUROC averages away.
COLUMNS = ("image_auroc", "tpr_at_fpr1", "tpr_at_fpr5", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter for this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (since the last reset on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Scored:
    """What a detector said about the test split, kept for metrics."""

    records: list[Record]
    scores: np.ndarray
    labels: np.ndarray
    maps: list[np.ndarray]
    masks: list[np.ndarray | None]
    verdicts: list[Verdict] = field(default_factory=list)


@dataclass
class EvalResult:
    """One evaluation: rows per defect type plus "overall", and what it cost."""

    method: str
    dataset: str
    rows: list[dict[str, Any]]
    cost: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)
    threshold: dict[str, Any] | None = None  # set from training images only (see `evaluate`)
    scored: Scored | None = field(default=None, repr=False)  # per-image results, for the HTML report
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def overall(self) -> dict[str, Any]:
        """The row over the whole test split."""
        return next(r for r in self.rows if r["defect"] == "overall")

    def to_json(self) -> str:
        keep = ("method", "dataset", "rows", "cost", "config", "threshold")
        return json.dumps({k: getattr(self, k) for k in keep}, indent=2, default=float)

    def worst(self, n: int = 4) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """(path, score) of the ``n`` good images scored highest (the worst false alarms)
        and the ``n`` defective images scored lowest (the worst misses); needs the scores
        (``keep_scores=True``, or a report)."""
        if self.scored is None:
            raise ConfigError("The per-image scores were not kept; evaluate with keep_scores=True (or a report).")
        good, bad = worst_indices(self.scored, n)
        pick = lambda idx: [(str(self.scored.records[i].path), float(self.scored.scores[i])) for i in idx]  # noqa: E731
        return pick(good), pick(bad)

    def to_dataframe(self) -> Any:
        """The metric table as a pandas DataFrame, one row per defect type and "overall"."""
        import pandas as pd

        return pd.DataFrame(self.table()).set_index("defect")

    def __repr__(self) -> str:
        o = self.overall
        auroc = "-" if o.get("image_auroc") is None else f"{o['image_auroc']:.3f}"
        return f"EvalResult({self.method} on {Path(self.dataset).name}: image AUROC {auroc}, {len(self.rows) - 1} defect types)"

    def table(self) -> list[dict[str, Any]]:
        """The metric table's rows: defect type, images, and every metric column."""
        return [{k: row.get(k) for k in ("defect", "n_images", *COLUMNS)} for row in self.rows]

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["defect", "n_images", *COLUMNS])
        writer.writeheader()
        writer.writerows(self.table())
        return buf.getvalue()

    def to_markdown(self) -> str:
        head = "| defect | images | " + " | ".join(COLUMNS) + " |"
        lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
        for row in self.rows:
            cells = [format_value(row.get(c)) for c in COLUMNS]
            lines.append(f"| {row['defect']} | {row['n_images']} | " + " | ".join(cells) + " |")
        cost = ", ".join(f"{k} {format_value(v, 2)}" for k, v in self.cost.items())
        text = f"**{self.method}** on `{self.dataset}`\n\n" + "\n".join(lines) + f"\n\n{cost}\n"
        if self.threshold is not None:
            text += f"\n{operating_point(self.threshold)}\n"
        return text


def worst_indices(scored: Scored, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the n highest-scored good images and the n lowest-scored defective ones."""
    labels = scored.labels.astype(bool)
    good, bad = np.nonzero(~labels)[0], np.nonzero(labels)[0]
    return good[np.argsort(-scored.scores[good], kind="stable")][:n], bad[np.argsort(scored.scores[bad], kind="stable")][:n]


def operating_point(t: dict[str, Any]) -> str:
    """The model's own threshold on the test split, in words: stated against realized
    false-alarm rate, and recall."""
    stated = "" if t.get("false_alarm_rate") is None else f", stated false-alarm rate {t['false_alarm_rate']:.1%}"
    return (
        f"Threshold {t['value']:.4g} ({t['method']}{stated}). At this threshold on the test split: realized false-alarm "
        f"rate {t['test_false_alarm_rate']:.3f} ({t['test_false_alarms']} of {t['test_good']} good images), "
        f"recall {t['test_recall']:.3f} ({t['test_caught']} of {t['test_defective']} defective images)."
    )


def format_value(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def shrink(amap: np.ndarray, mask: np.ndarray | None, long_side: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A map and its mask brought to at most ``long_side`` px on the long side (None: as
    they are): the map with area averaging, the mask centre-aligned nearest, as masks are
    brought to network size."""
    h, w = amap.shape
    if long_side is None or max(h, w) <= long_side:
        return amap, mask
    size = (max(1, round(h * long_side / max(h, w))), max(1, round(w * long_side / max(h, w))))
    small = F.interpolate(torch.from_numpy(amap)[None, None], size=size, mode="area")[0, 0].numpy()
    if mask is None:
        return small, None
    return small, Preprocess.mask(mask, Geometry((h, w), (0, 0, *size), size)).numpy()


def score_records(
    detector: Detector,
    records: list[Record],
    *,
    judge: Judge | None = None,
    batch_size: int = 8,
    metric_size: int | None = None,
    progress: Progress | None = None,
) -> Scored:
    """Score records through `scoring.score_samples` (every image scored, in order, also
    those ``judge`` calls invalid); keep scores, verdicts, content-cropped maps and masks
    (shrunk to ``metric_size`` px on the long side when larger, see `shrink`)."""
    scores, labels, maps, masks, verdicts = [], [], [], [], []
    for j in score_samples(detector, iter_samples(records, detector.preprocess), judge=judge, batch_size=batch_size, score_refused=True):
        s = j.sample
        scores.append(j.score)
        labels.append(s.label)
        verdicts.append(j.verdict)
        mask = None if s.mask is None else crop_content(s.mask, s.geometry).numpy()
        amap, mask = shrink(crop_content(j.map, s.geometry).numpy(), mask, metric_size)
        maps.append(amap)
        masks.append(mask)
        if progress:
            progress("predict", len(scores), len(records))
    return Scored(records, np.array(scores, dtype=np.float64), np.array(labels), maps, masks, verdicts)


def at_threshold(scored: Scored, threshold: float) -> dict[str, Any]:
    """Counts and rates at ``threshold`` on a scored test split (by the verdict rule)."""
    fp, fn = misclassified(scored.scores, scored.labels, threshold)
    n_bad = int(scored.labels.sum())
    n_good = len(scored.labels) - n_bad
    return {
        "test_false_alarm_rate": fp / max(n_good, 1), "test_miss_rate": fn / max(n_bad, 1), "test_recall": (n_bad - fn) / max(n_bad, 1),
        "test_false_alarms": fp, "test_good": n_good, "test_caught": n_bad - fn, "test_defective": n_bad,
    }


def metric_rows(scored: Scored, defects: list[str], curves: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per defect type (its images + all good ones) and overall; the overall row's pixel
    ROC and PRO curve points go into ``curves`` when it is given."""
    kinds = np.array([r.defect for r in scored.records])
    groups = [(d, (kinds == d) | (scored.labels == 0)) for d in defects] + [("overall", np.ones(len(kinds), bool))]
    rows = []
    for name, sel in groups:
        idx = np.nonzero(sel)[0]
        row: dict[str, Any] = {"defect": name, "n_images": int(idx.size)}
        row.update(image_metrics(scored.scores[idx], scored.labels[idx]))
        with_mask = [i for i in idx if scored.masks[i] is not None]
        if with_mask and any(scored.masks[i].any() for i in with_mask):
            plot = curves is not None and name == "overall"
            pixel = pixel_metrics([scored.maps[i] for i in with_mask], [scored.masks[i] for i in with_mask], with_curves=plot)
            if plot:
                curves.update(pixel.pop("curves"))
            row.update(pixel)
        rows.append(row)
    return rows


def evaluate(
    detector: Detector | str,
    data: str | Path | Dataset,
    *,
    config: dict[str, Any] | None = None,
    train: list[Record] | None = None,
    batch_size: int = 8,
    require_masks: bool = True,
    false_alarm_rate: float | None = None,
    keep_scores: bool = False,
    metric_size: int | None = None,
    fitted: bool = False,
    threshold: Threshold | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Fit ``detector`` (a registered name or an instance) on the dataset's normal training
    images (or ``train``), score its test split, and tabulate metrics and costs.

    ``fitted``: ``detector`` is already fitted (e.g. a loaded model file): nothing is fitted
    again, and ``threshold`` (if any) is the one measured at.
    ``false_alarm_rate``: also set the threshold a deployed model would use, from the
    training images alone (`Detector.fit_scored`, as `fit` does); its time is part of
    ``fit_s``. ``keep_scores``: keep per-image scores, maps and curves (for the report).
    ``metric_size``: pixel metrics on maps and masks of at most this long side (`shrink`;
    the cost row records it)."""
    ds = data if isinstance(data, Dataset) else load_dataset(data, require_masks=require_masks)
    if not ds.test:
        raise DataError(f"{ds.root} has no test split (test/<defect>/ folders); nothing to evaluate.")
    given = train is not None  # e.g. k shots for WinCLIP+, which needs no images otherwise
    train = ds.train if train is None else train
    det = make_detector(detector, **training_options(detector, len(train), config)) if isinstance(detector, str) else detector
    reset_peak_rss()
    t0 = time.perf_counter()
    uses_images = det.needs_training_images or given
    if not fitted and false_alarm_rate is not None and uses_images:
        normal = det.fit_scored(train, progress=progress)
        if normal is not None:
            threshold = from_normal(normal.scores, false_alarm_rate=false_alarm_rate, source=normal.how)
    elif not fitted:
        det.fit(training_samples(train, det.preprocess) if uses_images else None, progress=progress)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    scored = score_records(det, ds.test, batch_size=batch_size, metric_size=metric_size, progress=progress)
    predict_s = time.perf_counter() - t1
    cost = {
        "fit_s": fit_s,
        "predict_ms_per_image": 1000 * predict_s / len(ds.test),
        "peak_rss_mb": peak_rss_mb(),
        "train_images": float(len(train) if uses_images else 0),
    }
    if metric_size is not None:
        cost["metric_long_side"] = float(metric_size)
    curves: dict[str, Any] = {}
    rows = metric_rows(scored, ds.defects, curves if keep_scores else None)
    threshold_row = None
    if threshold is not None:
        threshold_row = {**threshold.to_dict(), **at_threshold(scored, threshold.value)}
    return EvalResult(
        det.name, str(ds.root), rows, cost, det.config(), threshold_row,
        scored if keep_scores else None, curves,
    )



@dataclass
class FewShotResult:
    """A protocol repeated per k and seed (k shots, or k labelled defects): per k, the
    overall metrics of every seed, and mean +- std."""

    method: str
    dataset: str
    runs: dict[int, list[dict[str, Any]]]
    protocol: str = "k-shot"

    def summary(self) -> dict[int, dict[str, tuple[float, float]]]:
        """Per k and metric: (mean, sample std over seeds; 0 for one seed)."""
        out: dict[int, dict[str, tuple[float, float]]] = {}
        for k, rows in self.runs.items():
            out[k] = {}
            for col in (*COLUMNS, *THRESHOLD_COLUMNS, "fit_s", "predict_ms_per_image"):
                vals = np.array([r[col] for r in rows if r.get(col) is not None], dtype=np.float64)
                vals = vals[np.isfinite(vals)]
                if vals.size:
                    out[k][col] = (float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else 0.0)
        return out

    def to_markdown(self) -> str:
        cols = (
            "image_auroc", "tpr_at_fpr1", "tpr_at_fpr5", "pixel_auroc", "aupro", "image_ap", "pixel_ap",
            *THRESHOLD_COLUMNS, "fit_s", "predict_ms_per_image",
        )
        summary = self.summary()
        cols = tuple(c for c in cols if any(c in stats for stats in summary.values()))
        lines = ["| k | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
        for k, stats in summary.items():
            cells = [f"{stats[c][0]:.3f} ± {stats[c][1]:.3f}" if c in stats else "-" for c in cols]
            lines.append(f"| {k} | {len(self.runs[k])} | " + " | ".join(cells) + " |")
        return f"**{self.method}** {self.protocol} on `{self.dataset}`\n\n" + "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(
            {"method": self.method, "dataset": self.dataset, "protocol": self.protocol, "runs": self.runs, "summary": self.summary()}, indent=2
        )

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["k", "seed", *COLUMNS, *THRESHOLD_COLUMNS, "fit_s", "predict_ms_per_image"])
        writer.writeheader()
        for k, rows in self.runs.items():
            for row in rows:
                writer.writerow({"k": k, **{f: row.get(f) for f in writer.fieldnames if f != "k"}})
        return buf.getvalue()


def evaluate_fewshot(
    method: str,
    data: str | Path | Dataset,
    *,
    shots: list[int],
    seeds: list[int],
    config: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> FewShotResult:
    """For each k and seed: sample k normal training images (seeded), fit, evaluate on the
    full test split. The method's ``fewshot_config`` applies under the user's ``config``."""
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    base = fewshot_options(method, config)
    runs: dict[int, list[dict[str, Any]]] = {}
    for k in shots:
        for seed in seeds:
            result = evaluate(method, ds, config=base, train=sample_shots(ds.train, k, seed), progress=progress)
            runs.setdefault(k, []).append({**result.overall, **result.cost, "seed": seed})
    return FewShotResult(method, str(ds.root), runs)


THRESHOLD_COLUMNS = ("test_false_alarm_rate", "test_recall")  # at the model's own threshold (`at_threshold`)


def labelled_split(ds: Dataset, k: int, seed: int, masks: bool = True) -> tuple[list[Record], Dataset]:
    """k defective test images drawn by ``seed`` to train on (with their masks, or as image
    labels only), and the dataset without them: the supervised protocol of SuperSimpleNet's
    mixed-supervision paper (the rest of the test split is evaluated)."""
    bad = [i for i, r in enumerate(ds.test) if r.label == 1]
    if not 0 <= k <= len(bad):
        raise ConfigError(f"Cannot take {k} labelled defects from the {len(bad)} defective test images of {ds.root}.")
    picked = set(np.random.default_rng(seed).choice(bad, size=k, replace=False).tolist()) if k else set()
    labelled = [ds.test[i] if masks else Record(ds.test[i].path, 1, ds.test[i].defect) for i in sorted(picked)]
    rest = Dataset(ds.root, ds.train, [r for i, r in enumerate(ds.test) if i not in picked])
    return labelled, rest


def evaluate_labelled(
    method: str,
    data: str | Path | Dataset,
    *,
    defects: list[int],
    seeds: list[int],
    masks: bool = True,
    config: dict[str, Any] | None = None,
    false_alarm_rate: float = 0.01,
    progress: Progress | None = None,
) -> FewShotResult:
    """For each k and seed: k labelled defects from the test split (`labelled_split`) train
    the model beside the normal training images; the threshold comes from normal images
    only, at ``false_alarm_rate``; the remaining test images are scored. k = 0 is the
    unsupervised model on the full test split (one run: no seed changes it)."""
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    runs: dict[int, list[dict[str, Any]]] = {}
    for k in defects:
        for seed in seeds if k else seeds[:1]:
            labelled, rest = labelled_split(ds, k, seed, masks)
            det = make_detector(method, **(config or {}))
            if labelled:
                det.use_defects(labelled)
            result = evaluate(det, rest, false_alarm_rate=false_alarm_rate, progress=progress)
            runs.setdefault(k, []).append({**result.overall, **result.cost, **(result.threshold or {}), "seed": seed})
    return FewShotResult(method, str(ds.root), runs, "with k labelled defects" + ("" if masks else " (image labels only)"))
