"""``flowerpress export``: a trained run's model as an artifact an edge runtime loads.

::

    flowerpress export RUN_DIR --format onnx --quantize int8 --out model.onnx

reads the run's global model (``RUN_DIR/model.npz``) and its run config
(``RUN_DIR/results.json``), rebuilds the task's torch model, exports it to
ONNX with PyTorch's exporter (``torch.onnx.export(dynamo=True)``, which needs
``onnxscript``) and, with ``--quantize int8``, applies onnxruntime's
post-training static quantization (``onnxruntime.quantization.quantize_static``:
QDQ format, int8 weights per output channel, uint8 activations, min-max
calibration; Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018). Calibration runs on
training data the task provides (the run's partitions, or a device's data
named with ``--calibration KEY=VALUE``), never on the test set.

Next to the artifact, ``FILE.json`` records what it is and what it costs: its
size against the float32 state's, its "compressed artifact size" (zstd of the
file: the pruned weights of a ``prune`` run are stored as zeros, since
onnxruntime has no simple sparse kernels for these graphs, so sparsity pays
in the compressed file, not in the loaded one) and the weights' sparsity,
accuracy and macro-F1 of the artifact run in onnxruntime on the task's test
set and of the float32 torch model on the same examples, and CPU latency per
example of both (batch 1, one thread).

The runtime is an optional extra: ``pip install 'flowerpress[export]'``.
ExecuTorch is not supported (``--format executorch`` is refused with one line):
see docs/benchmarks.md, "Device footprint".
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

#: The formats ``--format`` names (ExecuTorch refused, see the module doc).
FORMATS = ("onnx", "executorch")
QUANTIZATIONS = ("none", "int8")
#: ONNX opset of the exported graph (onnxruntime 1.2x runs it; QDQ per-channel needs >= 13).
OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportError(ValueError):
    """The run, the task or the request cannot be exported; one line for the user."""


@dataclass(frozen=True)
class ExportRequest:
    """What ``flowerpress export`` was asked.

    Attributes
    ----------
    run_dir : Path
        A finished or running flowerpress run (``results.json``, ``model.npz``).
    out : Path
        The artifact; its sidecar is ``out`` + ``.json``.
    format : str
        ``onnx`` (``executorch`` is refused).
    quantize : str
        ``none`` (float32) or ``int8`` (post-training static quantization).
    calibration : Mapping[str, bool | int | float | str] | None
        Node config of the data to calibrate on (``Task.load_data``); None:
        the run's partitions, in order, until ``calibration_examples``.
    calibration_examples : int
        Training examples the int8 ranges are calibrated on.
    latency_examples : int
        Test examples timed one at a time (after a warm-up of 20).
    """

    run_dir: Path
    out: Path
    format: str = "onnx"
    quantize: str = "none"
    calibration: Mapping[str, bool | int | float | str] | None = None
    calibration_examples: int = 512
    latency_examples: int = 300

    def check(self) -> None:
        """Raise ExportError naming the option that is not allowed."""
        if self.format == "executorch":
            raise ExportError("--format executorch is not supported: ExecuTorch is not a "
                              "dependency of flowerpress (see docs/benchmarks.md, \"Device "
                              "footprint\"); use --format onnx")
        if self.format not in FORMATS:
            raise ExportError(f"--format {self.format!r} is not allowed; expected onnx")
        if self.quantize not in QUANTIZATIONS:
            raise ExportError(f"--quantize {self.quantize!r} is not allowed; expected "
                              f"{' or '.join(QUANTIZATIONS)}")
        if self.calibration_examples < 1 or self.latency_examples < 1:
            raise ExportError("--calibration-examples and --latency-examples must be >= 1")


def _runtime() -> tuple[Any, Any]:
    """onnx and onnxruntime, or ExportError naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 (torch.onnx.export(dynamo=True) needs it)
    except ImportError as exc:
        raise ExportError(f"the export needs onnx, onnxscript and onnxruntime ({exc.name} is "
                          "missing): pip install 'flowerpress[export]'") from None
    return onnx, onnxruntime


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[NDArray[np.float32]]]:
    """A run's results document and its global model (float32, state_dict order)."""
    results, model = run_dir / "results.json", run_dir / "model.npz"
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory")
    if not results.is_file():
        raise ExportError(f"{run_dir} has no results.json: not a flowerpress run directory")
    if not model.is_file():
        raise ExportError(f"{run_dir} has no model.npz: the run has not finished a round")
    try:
        document = json.loads(results.read_text(encoding="utf-8"))
        with np.load(model, allow_pickle=False) as saved:
            weights = [np.asarray(saved[f"arr_{i}"], dtype=np.float32)
                       for i in range(len(saved.files))]
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"{run_dir}: cannot read the run: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise ExportError(f"{results} has no run config")
    return document, weights


def _task_of(document: Mapping[str, Any]) -> Any:
    """The run's task, rebuilt from its run config (a TorchClassifierTask)."""
    from flowerpress.config import ConfigError, validate
    from flowerpress.tasks.base import TaskError
    from flowerpress.tasks.classifier import TorchClassifierTask
    from flowerpress.tasks.registry import build_task, task_spec

    try:
        config = validate(document["config"], strict=False)
        recorded = (document.get("summary") or {}).get("task") or {}
        name = str(recorded.get("name") or task_spec(config))
        task = build_task(name, config)
    except (ConfigError, TaskError, ValueError) as exc:
        raise ExportError(f"cannot rebuild the run's task: {exc}") from None
    if not isinstance(task, TorchClassifierTask):
        raise ExportError(f"task {type(task).__name__} is not a TorchClassifierTask: export "
                          "needs its torch model")
    return task


def _calibration_data(task: Any, document: Mapping[str, Any], request: ExportRequest
                      ) -> tuple[NDArray[np.float32], str]:
    """Training examples to calibrate on, and where they came from."""
    from flowerpress.tasks.base import TaskError
    from flowerpress.tasks.classifier import as_split

    wanted = request.calibration_examples
    try:
        if request.calibration is not None:
            x = as_split(task.load_data(dict(request.calibration)), "calibration data").x
            return x[:wanted], f"node config {dict(request.calibration)}"
        clients = int(document["config"].get("num-clients", 1))
        parts: list[NDArray[np.float32]] = []
        used = 0
        for pid in range(clients):
            split = as_split(task.load_data({"partition-id": pid,
                                             "num-partitions": clients}), "calibration data")
            parts.append(split.x)
            used = pid + 1
            if sum(len(p) for p in parts) >= wanted:
                break
        x = np.concatenate(parts)[:wanted]
    except (TaskError, OSError, ValueError) as exc:
        raise ExportError(f"calibration data: {' '.join(str(exc).split())[:300]}; name a "
                          "device's data with --calibration KEY=VALUE (e.g. "
                          "data-path=FILE.npz)") from None
    if len(x) == 0:
        raise ExportError("calibration data: no examples")
    return x, f"training partitions 0-{used - 1} of {clients}"


def _export_float(model: Any, shape: tuple[int, ...], path: Path) -> None:
    """The float32 model as one ONNX file (weights inside), dynamic batch axis."""
    import logging
    import warnings

    import torch

    # The exporter warns once per torchvision operator it cannot register (not used here).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    model.eval()
    example = (torch.zeros((2, *shape)),)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, example, dynamo=True, external_data=False,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), opset_version=OPSET,
                                    verbose=False)
    if program is None:  # pragma: no cover (dynamo=True always returns the program)
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)


def _lean_inplace(onnx: Any, path: Path) -> None:
    """Drop what the runtime does not read (doc strings, node metadata such as source
    stack traces, intermediate value info): a few KB on a 100k-parameter model."""
    model = onnx.load(str(path))
    model.doc_string = ""
    del model.graph.value_info[:]
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    del model.metadata_props[:]
    onnx.save(model, str(path))


def _quantize_int8(source: Path, target: Path, calibration: NDArray[np.float32]) -> None:
    """onnxruntime's static int8 quantization (QDQ, per-channel weights) calibrated on data."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([calibration[i:i + 64] for i in range(0, len(calibration), 64)])

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}

    prepared = source.with_name(source.stem + ".pre.onnx")
    quant_pre_process(str(source), str(prepared))
    quantize_static(str(prepared), str(target), _Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)


def _session(onnxruntime: Any, path: Path) -> Any:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _quality(logits: Callable[[NDArray[np.float32]], NDArray[np.float32]],
             x: NDArray[np.float32], y: NDArray[np.int64]) -> dict[str, float]:
    from flowerpress.tasks.training import macro_f1

    pred = np.concatenate([np.asarray(logits(x[i:i + 256])).argmax(axis=1)
                           for i in range(0, len(x), 256)])
    return {"accuracy": float((pred == y).mean()), "f1_macro": macro_f1(y, pred)}


def _latency_ms(run: Callable[[NDArray[np.float32]], object], x: NDArray[np.float32],
                count: int) -> float:
    """Median milliseconds of one example's inference (batch 1), after a warm-up."""
    examples = [x[i % len(x)][None] for i in range(count)]
    for example in examples[:20]:
        run(example)
    times = []
    for example in examples:
        start = time.perf_counter()
        run(example)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(100.0 * (a - b), 3)


def export_run(request: ExportRequest) -> dict[str, Any]:
    """Write the artifact and its sidecar ``FILE.json``; return the sidecar's content.

    Raises
    ------
    ExportError
        One line: a run directory without a model, a task without a torch model,
        an unknown format, a missing runtime, no calibration data.
    """
    request.check()
    document, weights = load_run(request.run_dir)
    onnx, onnxruntime = _runtime()
    import torch

    from flowerpress.tasks.classifier import as_split
    from flowerpress.tasks.models import set_weights

    task = _task_of(document)
    model = task.model
    try:
        set_weights(model, weights)
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"{request.run_dir / 'model.npz'} does not fit the task's model: "
                          f"{' '.join(str(exc).split())[:200]}") from None
    shape = task.sample_shape()
    if shape is None:
        raise ExportError(f"task {type(task).__name__} does not know its input shape "
                          "(TorchClassifierTask.sample_shape)")
    central = task.central_data()
    test = None if central is None else as_split(central, "test data")
    request.out.parent.mkdir(parents=True, exist_ok=True)
    calibration_source: str | None = None
    calibration: NDArray[np.float32] = np.zeros((0,), np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(dir=request.out.parent) as scratch:
            plain = Path(scratch) / "float32.onnx"
            _export_float(model, tuple(shape), plain)
            _lean_inplace(onnx, plain)
            if request.quantize == "int8":
                calibration, calibration_source = _calibration_data(task, document, request)
                _quantize_int8(plain, Path(scratch) / "int8.onnx", calibration)
                _lean_inplace(onnx, Path(scratch) / "int8.onnx")
                os.replace(Path(scratch) / "int8.onnx", request.out)
            else:
                os.replace(plain, request.out)
        session = _session(onnxruntime, request.out)

        def artifact(x: NDArray[np.float32]) -> NDArray[np.float32]:
            out: NDArray[np.float32] = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            return out

        model.eval()

        @torch.no_grad()
        def float32(x: NDArray[np.float32]) -> NDArray[np.float32]:
            out: NDArray[np.float32] = model(torch.from_numpy(x)).numpy()
            return out

        quality: dict[str, dict[str, float] | None] = {"artifact": None, "float32_torch": None}
        latency: dict[str, float | None] = {"artifact": None, "float32_torch": None}
        if test is not None and len(test) > 0:
            quality = {"artifact": _quality(artifact, test.x, test.y),
                       "float32_torch": _quality(float32, test.x, test.y)}
            latency = {"artifact": _latency_ms(artifact, test.x, request.latency_examples),
                       "float32_torch": _latency_ms(float32, test.x, request.latency_examples)}
    finally:
        torch.set_num_threads(threads)
    state_bytes = sum(int(w.nbytes) for w in weights)
    artifact_bytes = request.out.stat().st_size
    mine, theirs = quality["artifact"], quality["float32_torch"]
    lat_a, lat_t = latency["artifact"], latency["float32_torch"]
    sidecar: dict[str, Any] = {
        "artifact": str(request.out), "format": request.format, "quantize": request.quantize,
        "runtime": {"name": "onnxruntime", "version": onnxruntime.__version__,
                    "opset": OPSET, "providers": ["CPUExecutionProvider"]},
        "run_dir": str(request.run_dir),
        "rounds_completed": len(document.get("rounds") or []),
        "task": type(task).__name__, "input_shape": [int(d) for d in shape],
        "parameters": int(sum(int(w.size) for w in weights)),
        "artifact_bytes": artifact_bytes, "float32_state_bytes": state_bytes,
        "size_ratio": round(state_bytes / artifact_bytes, 3),
        **_compressed_size(request.out, weights, state_bytes),
        "calibration": None if calibration_source is None else {
            "source": calibration_source, "examples": int(min(
                request.calibration_examples, len(calibration)))},
        "test_examples": 0 if test is None else len(test),
        "accuracy": {"artifact": None if mine is None else mine["accuracy"],
                     "float32_torch": None if theirs is None else theirs["accuracy"]},
        "f1_macro": {"artifact": None if mine is None else mine["f1_macro"],
                     "float32_torch": None if theirs is None else theirs["f1_macro"]},
        "accuracy_drop_points": _points(None if theirs is None else theirs["accuracy"],
                                        None if mine is None else mine["accuracy"]),
        "f1_drop_points": _points(None if theirs is None else theirs["f1_macro"],
                                  None if mine is None else mine["f1_macro"]),
        "latency_ms_per_example": {"artifact": lat_a, "float32_torch": lat_t,
                                   "speedup": None if not lat_a or lat_t is None
                                   else round(lat_t / lat_a, 3),
                                   "batch": 1, "threads": 1},
        "machine": machine(),
    }
    if test is None:
        sidecar["note"] = "the task has no test set (central_data() is None): no accuracy"
    path = Path(str(request.out) + ".json")
    path.write_text(json.dumps(sidecar, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return sidecar


#: zstd level of the "compressed artifact size" (what a device downloads and stores).
ARTIFACT_ZSTD_LEVEL = 19


def _compressed_size(path: Path, weights: Sequence[NDArray[np.float32]],
                     state_bytes: int) -> dict[str, Any]:
    """The artifact's size after zstd, and the fraction of the model's weights that are zero.

    onnxruntime has no simple sparse path for these graphs: a pruned model's
    artifact stores its pruned weights as zeros (int8 zero points keep them
    exactly zero), so the file on disk is as large as a dense one. zstd of the
    file is where sparsity pays: the size a device downloads and keeps,
    decompressed before onnxruntime loads it.
    """
    import zstandard

    compressed = len(zstandard.ZstdCompressor(level=ARTIFACT_ZSTD_LEVEL).compress(
        path.read_bytes()))
    total = sum(int(w.size) for w in weights)
    zeros = sum(int(w.size - np.count_nonzero(w)) for w in weights)
    return {"compressed_artifact_bytes": compressed,
            "compressed_size_ratio": round(state_bytes / compressed, 3),
            "compressed_with": f"zstd level {ARTIFACT_ZSTD_LEVEL} of the artifact file "
                               "(decompressed before onnxruntime loads it)",
            "weight_sparsity": round(zeros / total, 6) if total else 0.0}


def machine() -> dict[str, Any]:
    """The machine and its load when the numbers were taken."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average": [round(v, 2) for v in load]}


def summary_line(sidecar: Mapping[str, Any]) -> str:
    """One line for the terminal: size, accuracy and latency against float32 torch."""
    acc, lat = sidecar["accuracy"], sidecar["latency_ms_per_example"]

    def pct(value: object) -> str:
        return "-" if not isinstance(value, float) else f"{value:.4f}"

    def ms(value: object) -> str:
        return "-" if not isinstance(value, float) else f"{value:.3f} ms"

    return (f"{sidecar['artifact']}: {sidecar['artifact_bytes'] / 1e3:.1f} kB "
            f"({sidecar['size_ratio']:.2f}x smaller than the float32 state); accuracy "
            f"{pct(acc['artifact'])} (float32 torch {pct(acc['float32_torch'])}); latency "
            f"{ms(lat['artifact'])} per example (float32 torch {ms(lat['float32_torch'])}); "
            f"details in {sidecar['artifact']}.json")


def parse_node_config(items: Sequence[str]) -> dict[str, bool | int | float | str] | None:
    """``KEY=VALUE`` node-config entries (``--calibration``), or None for none."""
    if not items:
        return None
    out: dict[str, bool | int | float | str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ExportError(f"--calibration {item!r} is not allowed; expected KEY=VALUE")
        value: bool | int | float | str = raw.strip()
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
        out[key.strip()] = value
    return out
