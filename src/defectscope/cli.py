"""The `defectscope` command: fit, predict, evaluate, demo. Thin: parse, call, print."""

from __future__ import annotations

import inspect
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from defectscope import pipeline
from defectscope.api import load as load_model
from defectscope.api import tune as tune_model
from defectscope.backbones.runtime import ENV as RUNTIME_ENV
from defectscope.backbones.runtime import set_default_runtime
from defectscope.components.charts import loss_curve_png
from defectscope.data.datasets import Record, load_dataset, training_records
from defectscope.data.tiles import training_samples
from defectscope.decision.scoring import Judge
from defectscope.decision.thresholds import DEFAULT_FALSE_ALARM_RATE, check_rate
from defectscope.detectors.base import make_detector, method_class, training_options
from defectscope.engines.local import predict_folder
from defectscope.errors import DefectscopeError
from defectscope.evaluation.evaluate import evaluate as run_evaluate
from defectscope.evaluation.evaluate import evaluate_fewshot, evaluate_labelled
from defectscope.evaluation.report import html_report
from defectscope.evaluation.tune import DEFAULT_BACKBONES, DEFAULT_SIZES, DEFAULT_WEIGHTS
from defectscope.modelfiles.artifacts import load_detector, read_manifest, save_detector
from defectscope.modelfiles.export import export_model
from defectscope.modelfiles.runtimes import ExportedModel
from defectscope.serve.retrain import TRAINED_ON

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Find defects in images of parts.")
console = Console(stderr=True, soft_wrap=True)  # paths in messages stay on one line

Method = Annotated[str, typer.Option("--method", "-m", help="Detection method (patchcore, ...).")]
Options = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional here
    typer.Option("--set", help="Method option KEY=VALUE (JSON values), e.g. --set coreset_ratio=0.1."),
]
ClassName = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional here
    typer.Option("--class-name", help="The product's name, for text-prompted methods (e.g. winclip)."),
]
Size = Annotated[int, typer.Option(help="Network input size in pixels (long side, see --resize).")]
Runtime = Annotated[
    str,
    typer.Option(
        envvar=RUNTIME_ENV,
        help="Where the backbone runs: auto (OpenVINO, else onnxruntime, else torch; each checked against torch), "
        "openvino, onnxruntime or torch. Results are the same; a model file records none of it.",
    ),
]
Resize = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional here
    typer.Option(help="aspect (keep shape), letterbox (pad to square) or squash; default: the method's."),
]

Tile = Annotated[
    Optional[int],  # noqa: UP045 - typer needs Optional here
    typer.Option(help="Large images, small defects: score SIZE x SIZE tiles of the image at --scale and stitch their maps (--size/--resize then do not apply)."),
]
Overlap = Annotated[Optional[float], typer.Option(help="--tile: share of a tile's side that overlaps its neighbours (default 0.25).")]  # noqa: UP045
Scale = Annotated[Optional[float], typer.Option(help="--tile: scale images by this first; 1 = the camera's own pixels (default).")]  # noqa: UP045


def _preprocess(size: int, resize: str | None, tile: int | None, overlap: float | None, scale: float | None) -> dict[str, Any]:
    """The preprocess options the user gave (the method's defaults fill the rest)."""
    if tile is None and (overlap is not None or scale is not None):
        raise DefectscopeError("--overlap and --scale apply to tiles; add --tile SIZE (e.g. --tile 256).")
    preprocess: dict[str, Any] = {"size": size} if resize is None else {"size": size, "resize": resize}
    if tile is not None:
        preprocess |= {"tile": tile} | ({} if overlap is None else {"overlap": overlap}) | ({} if scale is None else {"scale": scale})
    return preprocess


def _option_value(method: str | None, key: str, value: str) -> Any:
    """A --set value: JSON, or a bare word for an option that takes text (its default is text
    or its type names str / Path, e.g. backbone=resnet18, prompts=file.dscope); anything
    else that is not JSON is refused, not taken as text."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    if method is not None:
        for cls in method_class(method).__mro__:  # the option may be a base class's (e.g. backbone)
            param = inspect.signature(cls.__init__).parameters.get(key) if "__init__" in vars(cls) else None
            if param is not None:
                if isinstance(param.default, str) or any(t in str(param.annotation) for t in ("str", "Path")):
                    return value
                break
    raise DefectscopeError(
        f"--set {key}={value}: {value!r} is not a JSON value (a number, true/false, null, a list, or a quoted string). "
        f'Write e.g. --set {key}=0.1 or --set \'{key}="text"\'.'
    )


def _options(options: list[str] | None, method: str | None) -> dict[str, Any]:
    """--set KEY=VALUE items as method options (`_option_value`)."""
    config: dict[str, Any] = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise DefectscopeError(f"--set expects KEY=VALUE, got {item!r}.")
        config[key] = _option_value(method, key, value)
    return config


def _config(
    size: int, resize: str | None, options: list[str] | None, class_name: str | None = None,
    tiling: tuple[int | None, float | None, float | None] = (None, None, None), method: str | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = {"preprocess": _preprocess(size, resize, *tiling)}
    if class_name is not None:
        config["class_name"] = class_name
    return config | _options(options, method)


@contextmanager
def _progress() -> Iterator[Any]:
    """A rich progress bar per stage; yields the library's (stage, done, total) callback.

    A stage's first word names its bar; the rest is shown beside it (e.g. "train loss 0.41")."""
    with Progress(
        TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bars:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            key = stage.split(" ", 1)[0]
            if key not in tasks:
                tasks[key] = bars.add_task(stage, total=total or None)
            bars.update(tasks[key], completed=done, total=total or None, description=stage)

        yield report


class ConsoleHandler(logging.Handler):
    """Log records as one line each on the CLI's (soft-wrapping) console: a path broken
    across lines cannot be copied. Printing through the console keeps progress bars intact."""

    def emit(self, record: logging.LogRecord) -> None:
        style = {"WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red"}.get(record.levelname, "")
        line = Text.assemble((f"{record.levelname.lower()}: ", style), record.getMessage())
        console.print(line, highlight=False)


def _run(fn: Any) -> Any:
    try:
        return fn()
    except DefectscopeError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Configure logging for the command line."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[ConsoleHandler()], force=True)


@app.command()
def fit(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MVTec layout) or a folder of normal images.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write.")] = Path("model.dscope"),
    method: Method = "patchcore",
    size: Size = 256,
    resize: Resize = None,
    tile: Tile = None,
    overlap: Overlap = None,
    scale: Scale = None,
    options: Options = None,
    class_name: ClassName = None,
    false_alarm_rate: Annotated[float, typer.Option(help="Share of normal parts the threshold may flag (set from all training images scored as unseen).")] = DEFAULT_FALSE_ALARM_RATE,
    holdout: Annotated[float, typer.Option(help="Old rule: hold out this fraction of normal images for the threshold instead (0: none).")] = 0.0,
    validation: Annotated[Optional[Path], typer.Option(help="MVTec-layout folder whose test split sets an F1-optimal threshold.")] = None,  # noqa: UP045
    force: Annotated[bool, typer.Option(help="Use a validation folder even if it shares images with DATA's test split or training images.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model file.")] = False,
    defects: Annotated[Optional[Path], typer.Option(help="Folder of labelled defective images (outlines as <name>_mask.png beside them) for a method that learns from them (supersimplenet); never part of the threshold.")] = None,  # noqa: UP045
    runtime: Runtime = "auto",
) -> None:
    """Fit a detector on normal images and write a model file."""

    def job() -> None:
        set_default_runtime(runtime)
        if output.exists() and not overwrite:
            raise DefectscopeError(f"{output} already exists; choose another -o or pass --overwrite.")
        check_rate(false_alarm_rate)
        config = _config(size, resize, options, class_name, (tile, overlap, scale), method)
        make_detector(method, **config)  # a wrong method or option fails before any image is read
        records = training_records(data)
        detector = make_detector(method, **training_options(method, len(records), config))
        with _progress() as report:
            fitted = pipeline.fit(
                detector, records, false_alarm_rate=false_alarm_rate, holdout=holdout, validation=validation,
                test_of=data, force=force, defects=defects, progress=report,
            )
        recorded = {**fitted.extra(), TRAINED_ON: str(data.resolve())}  # where `retrain` finds the normal images again
        save_detector(fitted.detector, output, extra=recorded, overwrite=overwrite)
        thr = fitted.threshold
        console.print(f"wrote [bold]{output}[/]" + (f"; threshold {thr.value:.4g} ({thr.method})" if thr else ""))
        curve = fitted.detector.training_curve()
        if curve is not None:
            console.print(f"loss curve {loss_curve_png(curve[0], output.with_suffix('.loss.png'), curve[1])}")

    _run(job)


@app.command()
def tune(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MVTec layout; only train/good is read) or a folder of normal images.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write.")] = Path("model.dscope"),
    budget_s: Annotated[float, typer.Option(help="Seconds of candidate fits; no new candidate starts after them (the final fit comes on top).")] = 600.0,
    backbones: Annotated[str, typer.Option(help="Comma-separated backbones to try.")] = ",".join(DEFAULT_BACKBONES),
    sizes: Annotated[str, typer.Option(help="Comma-separated input sizes (long side, px) to try.")] = ",".join(map(str, DEFAULT_SIZES)),
    whole_image_weights: Annotated[str, typer.Option(help="Comma-separated weights of the whole-image branch to try (0: off).")] = ",".join(f"{w:g}" for w in DEFAULT_WEIGHTS),
    tiles: Annotated[bool, typer.Option(help="Also try tiles at twice the resolution.")] = True,
    false_alarm_rate: Annotated[float, typer.Option(help="Share of normal parts the final model's threshold may flag.")] = DEFAULT_FALSE_ALARM_RATE,
    seed: Annotated[int, typer.Option(help="Seed of the validation split and the synthetic defects.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model file.")] = False,
    runtime: Runtime = "auto",
) -> None:
    """Choose PatchCore's backbone, size, tiles and whole-image branch on a split of the
    normal images with synthetic defects (never a test split), then fit the choice."""

    def job() -> None:
        set_default_runtime(runtime)
        if output.exists() and not overwrite:
            raise DefectscopeError(f"{output} already exists; choose another -o or pass --overwrite.")
        check_rate(false_alarm_rate)
        chosen = {
            "backbones": tuple(b.strip() for b in backbones.split(",") if b.strip()),
            "sizes": tuple(_ints(sizes, "--sizes")),
            "weights": tuple(_floats(whole_image_weights, "--whole-image-weights")),
        }
        with _progress() as report:
            model, result = tune_model(data, budget_s=budget_s, tiles=tiles, false_alarm_rate=false_alarm_rate, seed=seed, progress=report, **chosen)
        console.print(result.to_markdown())
        model.save(output, overwrite=overwrite)
        thr = model.threshold
        console.print(f"chose [bold]{result.choice.label}[/]; wrote [bold]{output}[/]" + (f"; threshold {thr:.4g}" if thr is not None else ""))

    _run(job)


EXIT_SKIPPED = 3  # predict: some images could not be read (listed in OUT/errors.csv); the rest were scored
EXIT_INVALID = 4  # predict: every file was read, but some frames could not be judged (verdict invalid)


def _engine(engine: str, detector: Any, model_file: Path | None, address: str | None, workers: int | None, threshold: float | None) -> Any:
    """The scorer for --engine: None (local, in this process) or a Ray scorer given the model's bytes."""
    if engine == "local":
        if address is not None or workers is not None:
            raise DefectscopeError("--address and --workers are for --engine ray.")
        return None
    if engine != "ray":
        raise DefectscopeError(f"Unknown --engine {engine!r}; use local or ray.")
    from defectscope.engines.ray_engine import ray_scorer

    if detector.scores_jointly:
        raise DefectscopeError(
            f"{detector.name} scores the images against each other; Ray would split them into separate "
            "batches and change every score. Use --engine local."
        )
    if isinstance(detector, ExportedModel):
        raise DefectscopeError(f"--engine ray runs model files; {detector.path} is an exported graph. Pass the .dscope file it came from.")
    if model_file is not None:
        return ray_scorer(model_file.read_bytes(), threshold=threshold, address=address, workers=workers)
    with tempfile.TemporaryDirectory() as tmp:  # a zero-shot detector: ship it as a model file like any other
        data = save_detector(detector, Path(tmp) / "zero-shot.dscope").read_bytes()
    return ray_scorer(data, threshold=threshold, address=address, workers=workers)


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="MODEL IMAGES... (model file or exported .onnx/.xml, then image files or folders); with --method, only IMAGES...")],
    out: Annotated[Path, typer.Option("--out", help="Folder for scores.csv, scores.jsonl, scores.json, errors.csv and heatmaps.")] = Path("predictions"),
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Zero-shot method that needs no model file (e.g. musc).")] = None,  # noqa: UP045
    size: Size = 256,
    resize: Resize = None,
    options: Options = None,
    class_name: ClassName = None,
    threshold: Annotated[Optional[float], typer.Option(help="Override the model's threshold.")] = None,  # noqa: UP045
    heatmaps: Annotated[bool, typer.Option(help="Write heatmap overlay PNGs.")] = True,
    resume: Annotated[bool, typer.Option(help="Continue a run into the same --out: skip images already in scores.csv.")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable image (default: list it in errors.csv and go on).")] = False,
    engine: Annotated[str, typer.Option(help="local (this process) or ray (a Ray cluster; a local one without --address).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="--engine ray: the cluster's address, as `ray start --head` prints it.")] = None,  # noqa: UP045
    workers: Annotated[Optional[int], typer.Option(help="--engine ray: scoring actors (default: one per 2 CPUs of the cluster).")] = None,  # noqa: UP045
    runtime: Annotated[str, typer.Option(envvar=RUNTIME_ENV, help="Where the backbone runs (see `fit --help`); an exported .onnx runs in onnxruntime (auto) or openvino.")] = "auto",
) -> None:
    """Score images with a fitted model (or a zero-shot --method); results stream into --out.

    Every row has a verdict: normal, defect, invalid (a frame the model cannot judge, with
    the reason) or unknown (no threshold). Exit status: 0 when every image was judged, 3
    when some could not be read (they are in OUT/errors.csv), 4 when none was unreadable
    but some were invalid, 2 on an error that stopped the run (what was scored is kept)."""

    def job() -> int:
        set_default_runtime(runtime)
        extra: dict[str, Any] = {}
        model_id = f"zero-shot {method}"
        if method is not None:
            detector = make_detector(method, **_config(size, resize, options, class_name, method=method))
            if detector.needs_training_images:
                raise DefectscopeError(f"{method} learns from normal images: run `defectscope fit DATA -m {method}` and pass the model file.")
            detector.fit(None)
            images = inputs
        else:
            if len(inputs) < 2:
                raise DefectscopeError("Give a model file and at least one image or folder (or a zero-shot --method).")
            loaded = load_model(inputs[0], runtime=runtime)
            detector, extra, model_id = loaded.detector, loaded.extra, loaded.model_id
            images = inputs[1:]
        judge = Judge.of(extra, str(inputs[0]) if method is None else model_id, threshold)
        paths, ignored = pipeline.expand_images(images)
        scorer = _engine(engine, detector, None if method is not None else inputs[0], address, workers, threshold)
        with _progress() as report:
            summary = predict_folder(
                detector, paths, out, judge=judge, model_id=model_id, map_range=extra.get("map_range"), overlays=heatmaps,
                resume=resume, strict=strict, scorer=scorer, progress=report,
            )
        summary.ignored = ignored
        console.print(summary.line(out))
        return EXIT_SKIPPED if summary.skipped else EXIT_INVALID if summary.invalid else 0

    code = _run(job)
    if code:
        raise typer.Exit(code)


def _hw(text: str | None) -> tuple[int, int] | None:
    """'128x256' -> (128, 256)."""
    if text is None:
        return None
    h, sep, w = text.lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit()):
        raise DefectscopeError(f"--input-size expects HxW in pixels (e.g. 128x256), got {text!r}.")
    return int(h), int(w)


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="Model file (.dscope) to export.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Exported file: .onnx (onnx) or .xml (+ .bin beside it, openvino).")],
    fmt: Annotated[str, typer.Option("--format", help="onnx or openvino.")] = "onnx",
    example: Annotated[Optional[Path], typer.Option(help="Aspect-mode models: an image from the camera; the graph takes inputs of its shape.")] = None,  # noqa: UP045
    input_size: Annotated[Optional[str], typer.Option(help="Aspect-mode models: the network input HxW instead of --example (e.g. 128x256).")] = None,  # noqa: UP045
    overwrite: Annotated[bool, typer.Option(help="Replace existing exported files.")] = False,
) -> None:
    """Export a fitted model to one ONNX or OpenVINO graph (image in, score and map out) for
    edge runtimes; `defectscope predict OUT IMAGES...` runs it with the same outputs."""

    def job() -> None:
        written = export_model(model, output, fmt, example=example, input_size=_hw(input_size), overwrite=overwrite)
        console.print("wrote " + ", ".join(f"[bold]{p}[/] ({p.stat().st_size / 2**20:.1f} MB)" for p in written))

    _run(job)


@app.command()
def ask(
    model: Annotated[Path, typer.Argument(help="Model file (.dscope).")],
    image: Annotated[Path, typer.Argument(help="The image to ask about.")],
    question: Annotated[str, typer.Argument(help='The question, e.g. "where?", "how big?", "is it a crack?".')] = "Is there an anomaly in this image?",
    defect_examples: Annotated[Optional[Path], typer.Option(help="Folder with one sub-folder of example images (+ <stem>_mask.png) per defect type.")] = None,  # noqa: UP045
    llm: Annotated[Optional[str], typer.Option(help="Phrase the answer with: smollm2, a .gguf file, or an OpenAI-compatible URL.")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="Print the finding, both answers and which was used, as JSON.")] = False,
) -> None:
    """Answer a question about one image in words, from the model's anomaly map only."""

    def job() -> None:
        from defectscope.decision.answers import ask as ask_image
        from defectscope.decision.answers import language_model
        from defectscope.decision.defect_types import DefectTypes

        loaded = load_model(model)
        detector, judge = loaded.detector, loaded.judge
        types = None if defect_examples is None else DefectTypes.from_folder(detector, defect_examples, judge.threshold)
        lm, unavailable = None, None
        try:
            lm = language_model(llm)
        except DefectscopeError as exc:
            unavailable = str(exc)
        result = ask_image(detector, image, question, judge=judge, types=types, llm=lm)
        result.llm_rejected = result.llm_rejected or unavailable
        if result.llm_rejected:
            console.print(f"[yellow]Language model answer not used: {result.llm_rejected}.[/]")
        typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.text)

    _run(job)


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DefectscopeError(f"{option} takes comma-separated numbers, e.g. 0,0.25,1; got {text!r}.") from None
    if not values:
        raise DefectscopeError(f"{option} is empty; give at least one number.")
    return values


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise DefectscopeError(f"{option} expects integers like 0,5,10, got {text!r}.") from None


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="Dataset folder in MVTec layout (train/good, test/*, ground_truth/*).")],
    method: Method = "patchcore",
    size: Size = 256,
    resize: Resize = None,
    tile: Tile = None,
    overlap: Overlap = None,
    scale: Scale = None,
    options: Options = None,
    class_name: ClassName = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the table (.md, .csv, .json) or a report (.html).")] = None,  # noqa: UP045
    false_alarm_rate: Annotated[Optional[float], typer.Option(help="Also set the threshold from the training images at this false-alarm rate and report its test error rates (.html: 0.01 by default).")] = None,  # noqa: UP045
    masks: Annotated[bool, typer.Option("--masks/--no-masks", help="Require a mask for every defective image.")] = True,
    shots: Annotated[Optional[str], typer.Option(help="k-shot protocol: comma-separated k, e.g. 1,2,4,8.")] = None,  # noqa: UP045
    seeds: Annotated[int, typer.Option(help="k-shot and labelled-defect protocols: seeds 0..N-1 per k.")] = 5,
    labelled_defects: Annotated[Optional[str], typer.Option(help="Supervised protocol: comma-separated k, e.g. 0,5,10,20: k defective test images (with masks) train the model, the rest are scored.")] = None,  # noqa: UP045
    label_only: Annotated[bool, typer.Option(help="--labelled-defects: give the k defects as image labels only, without their masks.")] = False,
    metric_size: Annotated[Optional[int], typer.Option(help="Compute pixel metrics on maps and masks shrunk to this long side (tiled maps of large images; default: the scored size).")] = None,  # noqa: UP045
    runtime: Runtime = "auto",
) -> None:
    """Fit on train/good (or k sampled shots), score the test split, print the metric table."""

    def job() -> None:
        set_default_runtime(runtime)
        config = _config(size, resize, options, class_name, (tile, overlap, scale), method)
        html = output is not None and output.suffix.lower() in (".html", ".htm")
        if shots and labelled_defects:
            raise DefectscopeError("Choose one protocol: --shots or --labelled-defects.")
        if html and (shots or labelled_defects):
            raise DefectscopeError("An HTML report is for one fit; write the protocol's table as .md, .csv or .json.")
        with _progress() as report:
            if shots:
                dataset = load_dataset(data, require_masks=masks)
                result = evaluate_fewshot(method, dataset, shots=_ints(shots, "--shots"), seeds=list(range(seeds)), config=config, progress=report)
            elif labelled_defects:
                dataset = load_dataset(data, require_masks=masks)
                result = evaluate_labelled(
                    method, dataset, defects=_ints(labelled_defects, "--labelled-defects"), seeds=list(range(seeds)),
                    masks=not label_only, config=config, false_alarm_rate=check_rate(false_alarm_rate or DEFAULT_FALSE_ALARM_RATE),
                    progress=report,
                )
            else:
                rate = DEFAULT_FALSE_ALARM_RATE if html and false_alarm_rate is None else false_alarm_rate
                result = run_evaluate(
                    method, data, config=config, require_masks=masks, progress=report,
                    false_alarm_rate=None if rate is None else check_rate(rate), keep_scores=html, metric_size=metric_size,
                )
        typer.echo(result.to_markdown())
        if html:
            html_report(result, output)
            console.print(f"wrote report {output}")
        elif output is not None:
            text = {".csv": result.to_csv, ".json": result.to_json}.get(output.suffix, result.to_markdown)()
            output.write_text(text)

    _run(job)


@app.command()
def synth(
    data: Annotated[Path, typer.Argument(help="Dataset folder (uses train/good) or a folder of normal images.")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the synthetic MVTec-layout dataset.")],
    kinds: Annotated[str, typer.Option(help="Comma-separated: perlin, cutpaste, scar, scratch, texture, noise, poisson, sdas (needs --ddpm), normal (generated normal images; needs --ddpm); whole-image: rotate, rescale, colour, remove.")] = "perlin,cutpaste,poisson",
    n: Annotated[int, typer.Option("--n", help="Defective images per kind.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same images.")] = 0,
    textures: Annotated[Optional[Path], typer.Option(help="Folder of texture images (DTD-style) for texture/perlin.")] = None,  # noqa: UP045
    foreground: Annotated[bool, typer.Option(help="Keep defects on the Otsu foreground.")] = False,
    preview: Annotated[Optional[Path], typer.Option(help="Write a contact sheet PNG (original | synthetic | mask).")] = None,  # noqa: UP045
    ddpm: Annotated[Optional[Path], typer.Option(help="Diffusion model from `train-ddpm`, for kinds sdas and normal.")] = None,  # noqa: UP045
    strength: Annotated[float, typer.Option(help="SDAS strength s: 0 gives normal-looking samples, larger less normal (paper: 0.1-0.2).")] = 0.15,
) -> None:
    """Make a synthetic test split with exact masks from normal images."""
    from defectscope.synthesis.split import make_synthetic_split

    def job() -> None:
        with _progress() as report:
            summary = make_synthetic_split(
                data, out, kinds=[k.strip() for k in kinds.split(",")], n=n, seed=seed,
                textures=textures, foreground=foreground, preview=preview, ddpm=ddpm, strength=strength, progress=report,
            )
        console.print(
            f"wrote {out}: train/good {summary.train}, test/good {summary.good}, "
            + ", ".join(f"{k} {v}" for k, v in summary.per_kind.items())
            + (f"; preview {summary.preview}" if summary.preview else "")
        )

    _run(job)


@app.command("train-prompts")
def train_prompts(
    aux: Annotated[list[Path], typer.Argument(help="Auxiliary datasets with masks (MVTec layout; e.g. made by `defectscope synth`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The prompts file to write.")],
    clip: Annotated[Optional[str], typer.Option("--clip", help="open_clip model name (default: the paper's ViT-L-14-336-quickgelu, OpenAI's activation).")] = None,  # noqa: UP045
    pretrained: Annotated[Optional[str], typer.Option(help="CLIP weights: an open_clip tag (from its cache) or a weight file (default: openai).")] = None,  # noqa: UP045
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    epochs: Annotated[int, typer.Option(help="Passes over the auxiliary images.")] = 15,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same prompts.")] = 111,
    cache_gb: Annotated[float, typer.Option(help="Keep the frozen CLIP embeddings in memory up to this size.")] = 4.0,
    options: Options = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing prompts file.")] = False,
) -> None:
    """AnomalyCLIP: learn object-agnostic prompts on images with masks (CLIP stays frozen)."""
    from defectscope.detectors.anomalyclip_training import train_prompts as run

    def job() -> None:
        config = {k: v for k, v in _config(0, None, options).items() if k != "preprocess"}
        config |= {k: v for k, v in (("clip_model", clip), ("clip_pretrained", pretrained)) if v is not None}
        with _progress() as report:
            summary = run(
                [str(a) for a in aux], output, options=config, epochs=epochs, batch_size=batch_size, lr=lr,
                seed=seed, device=device, cache_gb=cache_gb, overwrite=overwrite, progress=report,
            )
        console.print(
            f"wrote {summary['prompts']} ({summary['images']} images, {summary['steps']} steps, "
            f"{summary['train_seconds']:.0f} s; loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}); "
            f"loss curve {summary['loss_curve']}"
        )

    _run(job)


@app.command("train-ddpm")
def train_ddpm(
    data: Annotated[Path, typer.Argument(help="Dataset folder (uses train/good) or a folder of normal images.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The diffusion model file to write.")],
    size: Annotated[int, typer.Option(help="Image size the model learns (images are squashed to it).")] = 64,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-4,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same weights.")] = 0,
    hflip: Annotated[bool, typer.Option(help="Augment with horizontal flips (only if a mirrored part is still a normal part).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """SDAS: train a small diffusion model (DDPM) on normal images, for `synth --kinds sdas,normal` and RealNet."""
    from defectscope.components.diffusion import train_ddpm as run

    def job() -> None:
        with _progress() as report:
            summary = run(data, output, size=size, steps=steps, batch_size=batch_size, lr=lr, seed=seed, hflip=hflip,
                          overwrite=overwrite, progress=report)
        console.print(
            f"wrote {summary['ddpm']} ({summary['images']} images at {size} px, {steps} steps, {summary['train_seconds']:.0f} s; "
            f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}); loss curve {summary['loss_curve']}; samples {summary['samples']}"
        )

    _run(job)


@app.command("add-normals")
def add_normals(
    model: Annotated[Path, typer.Argument(help="Fitted model file.")],
    images: Annotated[list[Path], typer.Argument(help="Normal images (files or folders) to learn from.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The new model file (the old one is kept).")],
    runtime: Runtime = "auto",
) -> None:
    """Teach a fitted model more normal images without refitting (PatchCore, PaDiM, SPADE, FastRecon)."""

    def job() -> None:
        set_default_runtime(runtime)
        if output.exists():
            raise DefectscopeError(f"{output} already exists; choose a new name (model versions are never overwritten).")
        detector = load_detector(model)
        manifest = read_manifest(model)
        paths, _ = pipeline.expand_images(images)
        change = detector.add_normals(training_samples([Record(p) for p in paths], detector.preprocess))
        extra = {**manifest.get("extra", {}), "parent": manifest["sha256"][:12], "note": f"add-normals: {len(paths)} images"}
        save_detector(detector, output, extra=extra)
        console.print(f"wrote [bold]{output}[/] from {model} + {len(paths)} normal images: " + ", ".join(f"{k} {v}" for k, v in change.items()))

    _run(job)


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="Fitted model file to serve.")],
    host: Annotated[str, typer.Option(help="Interface to bind; anything but 127.0.0.1/localhost/::1 needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    watch: Annotated[Optional[Path], typer.Option(help="Score images dropped into this folder, each once.")] = None,  # noqa: UP045
    store: Annotated[Path, typer.Option(help="Folder for the results database, images, heatmaps and model versions.")] = Path("station"),
    token: Annotated[Optional[str], typer.Option(envvar="DEFECTSCOPE_TOKEN", help="Token for everything (uploads and changes); needed off loopback.")] = None,  # noqa: UP045
    read_token: Annotated[Optional[str], typer.Option(envvar="DEFECTSCOPE_READ_TOKEN", help="Optional second token that can only read (review page, results).")] = None,  # noqa: UP045
    allowed_host: Annotated[Optional[list[str]], typer.Option(help="A host name clients use to reach the station (e.g. the reverse proxy's); repeatable.")] = None,  # noqa: UP045
    max_request_mb: Annotated[float, typer.Option(help="Largest multipart request (several images), refused with 413 while it arrives.")] = 128.0,
    rate_limit: Annotated[str, typer.Option(help="Requests per client address, e.g. 200/second (all routes but /healthz).")] = "200/second",
    keep_days: Annotated[Optional[float], typer.Option(help="Delete images (and heatmaps) older than this many days; their results stay.")] = None,  # noqa: UP045
    max_store_gb: Annotated[Optional[float], typer.Option(help="Delete the oldest images while the store is larger than this.")] = None,  # noqa: UP045
    keep_versions: Annotated[int, typer.Option(help="Model versions written by the station kept on disk (pinned ones always are).")] = 10,
    keep_in_memory: Annotated[int, typer.Option(help="Model versions kept loaded (the served one included).")] = 3,
    retrain_set: Annotated[Optional[list[str]], typer.Option("--retrain-set", help="Method option KEY=VALUE for the page's retraining, e.g. --retrain-set budget_s=600.")] = None,  # noqa: UP045
    retrain_normals: Annotated[Optional[Path], typer.Option(help="Normal images for the page's retraining (default: the folder the model records).")] = None,  # noqa: UP045
    runtime: Runtime = "auto",
) -> None:
    """Serve a model: HTTP API, review page at /, results store, optional folder watching."""
    import uvicorn

    from defectscope.serve.access import Access
    from defectscope.serve.app import Limits, create_app
    from defectscope.serve.retention import Retention
    from defectscope.serve.station import Station
    from defectscope.serve.store import SQLiteStore
    from defectscope.serve.watch import FolderWatcher

    def job() -> None:
        set_default_runtime(runtime)
        access = Access.for_bind(host, token, read_token, allowed_host or ())
        limits = Limits(max_request_mb=max_request_mb, rate=rate_limit)
        retention = Retention(keep_days, max_store_gb, keep_versions)
        station = Station(
            model, SQLiteStore(store), retention=retention, keep_in_memory=keep_in_memory,
            retrain_options=_options(retrain_set, "supersimplenet"), retrain_normals=retrain_normals,
        )
        watcher = FolderWatcher(station, watch) if watch is not None else None
        web = create_app(station, access=access, limits=limits, watcher=watcher)
        if watcher:
            watcher.start()
        console.print(f"serving {model} (version {station.current.version}) on http://{host}:{port}/ ; store {store}"
                      + (f"; watching {watch}" if watch else ""))
        try:
            uvicorn.run(web, host=host, port=port, log_level="warning")
        finally:
            if watcher:
                watcher.stop()
            station.close()

    _run(job)


@app.command()
def retrain(
    store: Annotated[Path, typer.Argument(help="The station's store folder (its reviews, images and outlines).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The new model file (nothing is overwritten).")],
    model: Annotated[Optional[Path], typer.Option(help="The model to start from (default: the station's newest version).")] = None,  # noqa: UP045
    normals: Annotated[Optional[Path], typer.Option(help="The normal training images (default: the folder the model records).")] = None,  # noqa: UP045
    options: Options = None,
    runtime: Runtime = "auto",
) -> None:
    """Fit a new model version from the normal images, the images reviewed as good parts and
    the confirmed defects (with their outlines) of a station's store."""
    from defectscope.serve.retrain import retrain as retrain_from
    from defectscope.serve.store import SQLiteStore

    def job() -> None:
        set_default_runtime(runtime)
        if output.exists():
            raise DefectscopeError(f"{output} already exists; choose a new name (model versions are never overwritten).")
        if not (store / "results.sqlite3").is_file():
            raise DefectscopeError(f"{store} is not a station store (no results.sqlite3); pass the folder given to `serve --store`.")
        results = SQLiteStore(store)
        start = model or (Path(results.versions()[-1].path) if results.versions() else None)
        if start is None:
            raise DefectscopeError(f"{store} records no model version; pass --model.")
        with _progress() as report:
            detector, extra, summary = retrain_from(results, start, normals=normals, options=_options(options, "supersimplenet"), progress=report)
        save_detector(detector, output, extra=extra)
        console.print(f"wrote [bold]{output}[/] ({summary['method']}: {summary['normal_images']} normal images, "
                      f"{summary['reviewed_defects']} reviewed defects, {summary['outlined']} outlined)")

    _run(job)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's model, report and heatmaps.")] = Path("demo_output"),
    method: Method = "patchcore",
) -> None:
    """Fit, evaluate and predict on the bundled battery-weld sample; write a report."""
    from defectscope.demo import run_demo

    _run(lambda: run_demo(out, method, console, _progress))


if __name__ == "__main__":
    app()
