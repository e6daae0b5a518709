"""Where a frozen backbone runs: OpenVINO, onnxruntime or torch, chosen when it is loaded.

Every path that computes features (fit, predict, evaluate, the threshold's cross-fitting,
tiles, the station, Ray workers, add-normals) gets its backbone from
`defectscope.backbones.get_backbone`, which wraps it here: a `RuntimeBackbone` has the same
interface (images N x 3 x H x W in [0, 1] -> list of feature maps) and runs a graph of the
torch module in the chosen runtime.

- **Choice.** ``auto`` (the default) takes OpenVINO (compiled for float32: on CPUs with
  bfloat16 units its default hint would move the features), else onnxruntime, else torch.
  ``--runtime`` / ``DEFECTSCOPE_RUNTIME`` (the process default) or a method's ``runtime``
  option override it. A model file records nothing about the runtime: one fitted in torch
  predicts in OpenVINO and the reverse.
- **Graphs.** Images keep their aspect ratio by default, so one dataset meets many input
  sizes (magnetic_tile: 252). The backbone is first traced with height and width free and
  trusted at every size only if it reproduces torch at two unlike sizes (EfficientNet and
  VGG do; DINOv2's graph keeps the position-embedding grid of its trace size and does
  not); otherwise each size gets a graph of its own, up to ``MAX_SIZES``. Tracing uses
  torch's TorchScript exporter (0.9 s for EfficientNet-Lite0 against 6 s with
  ``torch.export``, which takes over for modules the tracer refuses); neither takes the
  TorchScript blocks of the Inception backbone, which runs in torch, with a warning.
- **Parity.** The first time a graph is built or loaded in a process, a real image (the
  bundled sample's first training image, and its mirror image as a second batch row) goes
  through torch and the graph; if any feature map differs by more than ``PARITY`` (1e-4)
  of its largest magnitude, the runtime is refused with the difference named: an error
  when it was asked for, a warning and the next runtime under ``auto``. Nothing falls back
  silently.
- **Cache.** ONNX graphs are written once per machine under ``DEFECTSCOPE_CACHE`` (default
  ``~/.cache/defectscope/graphs``), keyed by backbone, stages, weights hash, input size
  (or none) and the torch version that traced them; OpenVINO's converted graph beside them,
  keyed also by OpenVINO's version, and its compiled kernels in OpenVINO's own cache. Files
  are written to a temporary name and renamed, so processes sharing the cache never read
  half a file.
- **Threads.** Both runtimes use as many threads as torch is set to (the Ray engine sets
  it per worker), so one knob governs every path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.errors import ConfigError

log = logging.getLogger("defectscope")

RUNTIMES = ("auto", "openvino", "onnxruntime", "torch")
AUTO_ORDER = ("openvino", "onnxruntime")
PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
ENV, CACHE_ENV = "DEFECTSCOPE_RUNTIME", "DEFECTSCOPE_CACHE"
GRAPH_FORMAT = 1  # bump when the traced graph changes meaning
PARITY = 1e-4  # largest feature difference a runtime may show, relative to the map's largest magnitude
MAX_SIZES = 8  # input sizes given a graph of their own (backbones whose graph is not size-free); more run in torch
PARITY_IMAGE = Path(__file__).resolve().parents[1] / "sample_data" / "battery_weld" / "train" / "good"

Run = Callable[[np.ndarray], list[np.ndarray]]


def check_runtime(name: str) -> str:
    """``name`` if it is a runtime defectscope knows, else a ConfigError listing them."""
    if name not in RUNTIMES:
        raise ConfigError(f"Unknown runtime {name!r}; use one of {', '.join(RUNTIMES)}.")
    return name


def default_runtime() -> str:
    """The process's runtime: ``DEFECTSCOPE_RUNTIME`` (inherited by Ray workers), else auto."""
    return check_runtime(os.environ.get(ENV, "auto"))


def set_default_runtime(name: str) -> None:
    """Make ``name`` the process's runtime (and its child processes')."""
    os.environ[ENV] = check_runtime(name)


def runtime_env_vars() -> dict[str, str]:
    """The settings a worker process needs to run backbones as this one does (Ray's runtime_env)."""
    return {key: os.environ[key] for key in (ENV, CACHE_ENV) if os.environ.get(key)}


def cache_dir() -> Path:
    """Where graphs are cached: ``DEFECTSCOPE_CACHE``, else ``$XDG_CACHE_HOME`` or ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "defectscope" / "graphs"


def version_of(package: str) -> str:
    return importlib.metadata.version(package)


def installed(runtime: str) -> bool:
    return runtime == "torch" or importlib.util.find_spec(PACKAGES[runtime]) is not None


def graph_key(module: nn.Module, size: tuple[int, int] | None) -> str:
    """Content key of a backbone's graph at ``size`` (None: any size), traced by this torch."""
    parts = {
        "format": GRAPH_FORMAT, "backbone": module.name, "stages": list(getattr(module, "stages", ())),
        "weights": module.weights_hash, "size": None if size is None else list(size), "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary name beside ``path``, then rename it into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise ConfigError(
            f"Cannot write the graph cache in {path.parent} ({exc.strerror or exc}); set {CACHE_ENV} to a writable folder."
        ) from exc
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def onnx_graph(module: nn.Module, size: tuple[int, int], fixed: bool = True) -> Path:
    """The cached ONNX graph of ``module``, traced at ``size`` now if it is not cached: for
    that size only, or (``fixed=False``) with height and width left free."""
    path = cache_dir() / f"{module.name}-{graph_key(module, size if fixed else None)}.onnx"
    if path.is_file():
        return path
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    free = {0: "batch"} if fixed else {0: "batch", 2: "height", 3: "width"}
    log.info("Tracing the %s backbone for the fast runtime (once per machine)...", module.name)

    def trace(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            try:
                torch.onnx.export(module.eval(), (x,), str(tmp), dynamo=False, input_names=["image"], dynamic_axes={"image": free})
            except Exception:  # noqa: BLE001 - the tracer refuses some modules; torch.export may take them
                from torch.export import Dim

                shapes = {0: Dim("batch", min=1, max=4096)} if fixed else {0: Dim("batch", min=1, max=4096), 2: Dim("height"), 3: Dim("width")}
                with contextlib.redirect_stdout(None):  # torch.onnx prints its progress
                    program = torch.onnx.export(module.eval(), (x,), dynamo=True, dynamic_shapes={"x": shapes}, input_names=["image"], verbose=False)
                program.save(str(tmp))

    _atomic_write(path, trace)
    return path


def _threads() -> int:
    return max(1, torch.get_num_threads())


def onnxruntime_run(path: Path) -> Run:
    """A function running the ONNX graph at ``path`` in onnxruntime (thread-safe)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {session.get_inputs()[0].name: x})


def openvino_run(onnx_path: Path) -> Run:
    """A function running an ONNX graph in OpenVINO, float32; the converted graph is cached
    beside it (keyed also by OpenVINO's version), the compiled kernels in OpenVINO's cache;
    one infer request per thread."""
    import openvino as ov

    tag = hashlib.sha256(f"{onnx_path.name} openvino {version_of('openvino')}".encode()).hexdigest()[:24]
    xml = onnx_path.with_name(f"{onnx_path.stem}-ov-{tag}.xml")
    if not (xml.is_file() and xml.with_suffix(".bin").is_file()):
        converted = ov.convert_model(str(onnx_path))
        staged = Path(tempfile.mkdtemp(dir=xml.parent, prefix=".ov."))
        try:
            ov.save_model(converted, str(staged / xml.name), compress_to_fp16=False)
            os.replace(staged / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
            os.replace(staged / xml.name, xml)
        finally:
            for leftover in staged.iterdir():
                leftover.unlink()
            staged.rmdir()
    core = ov.Core()
    core.set_property({"CACHE_DIR": str(xml.parent / "openvino_kernels")})
    compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": _threads()})
    local = threading.local()

    def run(x: np.ndarray) -> list[np.ndarray]:
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        result = local.request.infer({0: x})
        return [np.array(result[out]) for out in compiled.outputs]

    return run


def parity_batch(size: tuple[int, int]) -> torch.Tensor:
    """A real image and its mirror image at ``size``: 2 x 3 x H x W in [0, 1]."""
    from PIL import Image

    first = min(PARITY_IMAGE.iterdir())
    with Image.open(first) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return torch.cat([x, x.flip(-1)])


def parity_error(module: nn.Module, run: Run, size: tuple[int, int]) -> float:
    """Largest difference between torch's feature maps and the runtime's on a real image,
    relative to each map's largest magnitude."""
    x = parity_batch(size)
    with torch.no_grad():
        reference = module(x)
    got = run(np.ascontiguousarray(x.numpy()))
    if len(got) != len(reference):
        return float("inf")
    return max(
        float(np.max(np.abs(g - r.numpy())) / max(float(r.abs().max()), 1e-12)) if g.shape == tuple(r.shape) else float("inf")
        for g, r in zip(got, reference, strict=True)
    )


def other_size(size: tuple[int, int]) -> tuple[int, int]:
    """A second input size unlike ``size`` (odd sides, another aspect ratio) on which a graph
    traced at ``size`` must also reproduce torch to be trusted at any size."""
    return max(33, size[0] * 3 // 4 + 7), max(33, size[1] * 5 // 4 + 3)


def load_run(runtime: str, path: Path) -> Run:
    return onnxruntime_run(path) if runtime == "onnxruntime" else openvino_run(path)


def refused(module: nn.Module, runtime: str, size: tuple[int, int], error: float) -> ConfigError:
    return ConfigError(
        f"{runtime} does not reproduce torch's {module.name} features at {size[0]} x {size[1]} (largest difference "
        f"{error:.2g} of the maps' scale, allowed {PARITY:g}); run with --runtime torch, and please report this."
    )


def _holds_at(module: nn.Module, run: Run, size: tuple[int, int]) -> bool:
    """Whether ``run`` reproduces torch at ``size`` (a graph that cannot run it does not)."""
    try:
        return parity_error(module, run, size) <= PARITY
    except Exception:  # noqa: BLE001 - runtimes raise their own types for a shape the graph cannot take
        return False


def build_run(module: nn.Module, runtime: str, size: tuple[int, int], any_size: bool = True) -> tuple[Run, bool]:
    """The runtime's graph of ``module``, checked against torch (`parity_error`), and whether
    it takes any input size. A graph with height and width free is tried first (unless
    ``any_size`` is False: it failed already) and trusted at any size when it reproduces
    torch at ``size`` and at `other_size` (EfficientNet's and VGG's do; DINOv2's bakes its
    position-embedding grid in and does not); else a graph for ``size`` alone. A
    ConfigError naming the difference when neither reproduces torch."""
    if any_size:
        generic = load_run(runtime, onnx_graph(module, size, fixed=False))
        if _holds_at(module, generic, size) and _holds_at(module, generic, other_size(size)):
            return generic, True
    run = load_run(runtime, onnx_graph(module, size))
    error = parity_error(module, run, size)
    if not error <= PARITY:
        raise refused(module, runtime, size, error)
    return run, False


class RuntimeBackbone(nn.Module):
    """A backbone that runs its graph in ``runtime`` (see the module docstring), one graph per
    input size; under ``torch.export`` (model export) it is the torch module itself."""

    def __init__(self, module: nn.Module, runtime: str) -> None:
        super().__init__()
        self.module = module
        self.runtime = check_runtime(runtime)
        self.name, self.weights_hash = module.name, module.weights_hash
        self._runs: dict[tuple[int, int], tuple[str, Run | None]] = {}
        self._any_size: tuple[str, Run] | None = None  # a graph that takes every input size, once one passed
        self._sized: set[str] = set()  # runtimes whose size-free graph failed: only graphs per size are tried
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def runtime_for(self, size: tuple[int, int]) -> str:
        """The runtime that scores inputs of ``size`` (building and checking its graph first)."""
        return self._resolve(size)[0]

    def runtimes(self) -> dict[tuple[int, int], str]:
        """The input sizes met so far and the runtime each runs in."""
        with self._lock:
            return {size: name for size, (name, _) in self._runs.items()}

    def _resolve(self, size: tuple[int, int]) -> tuple[str, Run | None]:
        with self._lock:
            if size not in self._runs:
                self._runs[size] = self._choose(size)
            return self._runs[size]

    def _choose(self, size: tuple[int, int]) -> tuple[str, Run | None]:
        if self.runtime == "torch":
            return "torch", None
        if self._any_size is not None:
            return self._any_size
        if sum(run is not None for _, run in self._runs.values()) >= MAX_SIZES:
            log.warning("%s: graphs for %d input sizes already; %d x %d runs in torch.", self.name, MAX_SIZES, *size)
            return "torch", None
        candidates = AUTO_ORDER if self.runtime == "auto" else (self.runtime,)
        for runtime in candidates:
            if not installed(runtime):
                if self.runtime != "auto":
                    raise ConfigError(f"--runtime {runtime} needs the {PACKAGES[runtime]} package: pip install {PACKAGES[runtime]}.")
                continue
            try:
                run, any_size = build_run(self.module, runtime, size, any_size=runtime not in self._sized)
                if any_size:
                    self._any_size = runtime, run
                else:
                    self._sized.add(runtime)
                return runtime, run
            except Exception as exc:  # noqa: BLE001 - a runtime failing to convert or match torch falls to the next
                if self.runtime != "auto" and isinstance(exc, ConfigError):
                    raise
                if self.runtime != "auto":
                    raise ConfigError(f"{runtime} cannot run the {self.name} backbone: {exc}") from exc
                log.warning("%s cannot run the %s backbone at %d x %d (%s); trying the next runtime.", runtime, self.name, *size, exc)
        log.warning("The %s backbone runs in torch at %d x %d: no faster runtime is installed or passed its check.", self.name, *size)
        return "torch", None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.module(x)
        _, run = self._resolve(tuple(x.shape[-2:]))
        if run is None:
            return self.module(x)
        return [torch.from_numpy(a) for a in run(np.ascontiguousarray(x.detach().numpy(), dtype=np.float32))]
