"""INT8 post-training quantization to a Q/DQ ONNX model that TensorRT builds as explicit quantization.

ONNX Runtime's ``quantize_static`` in QDQ format, signed INT8 for activations and weights, symmetric
(zero points are 0: TensorRT accepts no other), per-channel weight scales, calibrated on an array of
preprocessed images (MinMax, Entropy or Percentile). ORT's ``quant_pre_process`` runs first (symbolic shape
inference, so every tensor gets calibrated; no graph optimisation, so node names stay those of the FP32
model and ``exclude_nodes`` can name them).

TensorRT form (``for_tensorrt=True``, the default and the only form for a bundle): weights stay FP32 behind
a QuantizeLinear/DequantizeLinear pair and biases stay FP32 (TensorRT 8.5's ONNX parser rejects INT8/INT32
constants fed to DequantizeLinear: "invalid weights type of Int8", "only activation types allowed as
input"; this is also the form NVIDIA's pytorch-quantization exports). TensorRT folds the weight Q/DQ at
build time. ``for_tensorrt=False`` makes a CPU-only variant (unsigned, asymmetric activations, INT8
weight initialisers) that ONNX Runtime's CPU kernels fuse well; TensorRT refuses it, never ship it.

This module is device-safe: it imports onnx and numpy, and ONNX Runtime only when called.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.fsutil import atomic_file
from edge_tl.core.importer import require
from edge_tl.core.qdq import FORBIDDEN_OPS, QDQ_OPS, check_float_qdq  # noqa: F401 (re-exported)

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

#: Entropy calibration as TensorRT does it (IInt8EntropyCalibrator2; Migacz, "8-bit Inference with TensorRT", GTC
#: 2017): each activation's histogram in 2048 bins, the INT8 range the 128-bin truncation with the least KL
#: divergence. ONNX Runtime's quantize_static builds its Entropy calibrator with 128 bins for 128 quantized bins
#: (onnxruntime/quantization/calibrate.py, create_calibrator) and passes no option that changes them, so its one
#: candidate is the whole range: MinMax's scales (measured, benchmarks/RESULTS.md "calib-method"). The ranges are
#: therefore computed here with ORT's calibrator at these bins and handed to quantize_static as rmin/rmax overrides.
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 128


@dataclass
class QuantizeResult:
    path: Path
    method: str
    calib_count: int
    per_channel: bool
    quantized_nodes: list[str] = field(default_factory=list)  # compute nodes fed by a DequantizeLinear
    excluded_nodes: list[str] = field(default_factory=list)  # kept in FP32 on request
    for_tensorrt: bool = True
    op_types: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"path": str(self.path), "method": self.method, "calib_count": self.calib_count,
                "per_channel": self.per_channel, "quantized_nodes": len(self.quantized_nodes),
                "excluded_nodes": list(self.excluded_nodes), "for_tensorrt": self.for_tensorrt,
                "op_types": self.op_types}


def _input_spec(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise EdgeTLError(f"the model has {len(inputs)} inputs", "INT8 calibration supports one-input classifiers")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _check_calib(calib: np.ndarray, dims: list[int | None]) -> np.ndarray:
    calib = np.asarray(calib)
    if calib.ndim != len(dims) or len(calib) == 0:
        raise EdgeTLError(f"calibration data has shape {calib.shape}, the model takes {dims}",
                          "give a non-empty (N, C, H, W) array of preprocessed images")
    for got, want in zip(calib.shape[1:], dims[1:], strict=True):
        if want is not None and got != want:
            raise EdgeTLError(f"calibration data has shape {calib.shape}, the model takes {dims}",
                              "preprocess calibration images exactly like the model's input")
    if not np.isfinite(calib).all():
        raise EdgeTLError("calibration data contains NaN or infinity", "check the calibration images")
    return np.ascontiguousarray(calib, dtype=np.float32)


def quantized_node_names(model: onnx.ModelProto) -> list[str]:
    """Names of compute nodes (not Q/DQ) with at least one input produced by a DequantizeLinear."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type not in QDQ_OPS and any(i in dq_out for i in n.input)]


def check_tensorrt_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Op counts of a Q/DQ model after checking TensorRT can build it as explicit quantization."""
    ops = Counter(n.op_type for n in model.graph.node)
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    if bad:
        raise CheckFailed(f"the INT8 model has operators TensorRT cannot import: {', '.join(bad)}",
                          "quantize in QDQ format")
    if not ops["QuantizeLinear"] or not ops["DequantizeLinear"]:
        raise CheckFailed("the INT8 model has no QuantizeLinear/DequantizeLinear nodes", "nothing was quantized")
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in QDQ_OPS and len(node.input) > 2 and node.input[2] in inits:
            zp = onnx.numpy_helper.to_array(inits[node.input[2]])
            if zp.dtype != np.int8 or np.any(zp != 0):
                raise CheckFailed(f"{node.name} has zero point {zp.ravel()[:4]} ({zp.dtype})",
                                  "TensorRT needs symmetric INT8 (zero point 0)")
    return dict(sorted(ops.items()))


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calib: np.ndarray, method: str = "minmax",
                  per_channel: bool = True, exclude_nodes: Iterable[str] = (), *, for_tensorrt: bool = True,
                  calib_batch: int = 16, percentile: float = 99.999, preprocess: bool = True) -> QuantizeResult:
    """Quantize the FP32 ONNX model at ``fp32_path`` to INT8 Q/DQ at ``int8_path`` (written atomically).

    ``calib``: preprocessed calibration images, float32 (N, C, H, W), e.g. from the training split.
    ``exclude_nodes``: node names (as in the FP32 model) kept in FP32.
    """
    qz = require("onnxruntime.quantization", "INT8 quantization")
    if method not in METHODS:
        raise EdgeTLError(f"unknown calibration method '{method}'", f"choose one of: {', '.join(METHODS)}")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if not fp32_path.is_file():
        raise EdgeTLError(f"FP32 model {fp32_path} does not exist", "export the FP32 model first")
    name, dims = _input_spec(onnx.load(str(fp32_path), load_external_data=False))
    calib = _check_calib(calib, dims)
    exclude = list(dict.fromkeys(exclude_nodes))
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=int8_path.parent) as td:
        src = Path(td) / "pre.onnx"
        if preprocess:
            try:
                qz.shape_inference.quant_pre_process(str(fp32_path), str(src), skip_optimization=True)
            except ImportError:  # symbolic shape inference needs sympy; ONNX's own inference is enough for CNNs
                qz.shape_inference.quant_pre_process(str(fp32_path), str(src), skip_optimization=True,
                                                     skip_symbolic_shape=True)
        else:
            src = fp32_path
        names = {n.name for n in onnx.load(str(src), load_external_data=False).graph.node}
        unknown = [n for n in exclude if n not in names]
        if unknown:
            raise EdgeTLError(f"nodes to keep in FP32 are not in the model: {', '.join(unknown)}",
                              "name nodes as they appear in model.onnx (e.g. with Netron)")
        batches = _batches(calib, calib_batch, equal=method != "minmax")
        extra = {"WeightSymmetric": True, "CalibPercentile": percentile,
                 "ActivationSymmetric": for_tensorrt, "AddQDQPairToWeight": for_tensorrt,
                 "QuantizeBias": not for_tensorrt}
        calibrate_method = METHODS[method]
        if method == "entropy":  # ranges from a 2048-bin calibrator; quantize_static's own pass is then MinMax's
            extra["TensorQuantOverrides"] = _entropy_ranges(qz, src, name, batches, Path(td), for_tensorrt)
            calibrate_method = METHODS["minmax"]
        with atomic_file(int8_path, suffix=".onnx") as tmp_out:  # renamed over int8_path only if every check passes
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
                qz.quantize_static(
                    str(src), str(tmp_out), _reader(qz, name, batches), quant_format=qz.QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=qz.QuantType.QInt8 if for_tensorrt else qz.QuantType.QUInt8,
                    weight_type=qz.QuantType.QInt8, nodes_to_exclude=exclude,
                    calibrate_method=getattr(qz.CalibrationMethod, calibrate_method), extra_options=extra)
            model = onnx.load(str(tmp_out))
            onnx.checker.check_model(model)
            ops = check_tensorrt_qdq(model) if for_tensorrt else dict(sorted(Counter(n.op_type for n in
                                                                                       model.graph.node).items()))
            quantized = quantized_node_names(model)
            still_fp32 = [n for n in exclude if n in quantized]
            if still_fp32:
                raise CheckFailed(f"nodes asked to stay FP32 were quantized: {', '.join(still_fp32)}",
                                  "report this bug")
    return QuantizeResult(int8_path, method, len(calib), per_channel, quantized, exclude, for_tensorrt, ops)


def _entropy_ranges(qz, model: Path, input_name: str, batches: list[np.ndarray], work: Path,
                    symmetric: bool) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every activation's INT8 range by TensorRT's entropy rule (:data:`ENTROPY_BINS`), as quantize_static's
    ``TensorQuantOverrides`` (tensor name -> [{"rmin", "rmax"}])."""
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrator = create_calibrator(
        model, [], augmented_model_path=str(work / "entropy-augmented.onnx"),
        calibrate_method=qz.CalibrationMethod.Entropy,
        extra_options={"symmetric": symmetric, "num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS})
    with contextlib.redirect_stdout(io.StringIO()):
        calibrator.collect_data(_reader(qz, input_name, batches))
        ranges = calibrator.compute_data()
    out = {}
    for tensor, value in ranges.items():
        lo, hi = getattr(value, "range_value", value)  # TensorData (ORT >= 1.16) or a (min, max) pair
        out[tensor] = [{"rmin": np.asarray(lo, np.float32), "rmax": np.asarray(hi, np.float32)}]
    return out


def _batches(calib: np.ndarray, size: int, equal: bool) -> list[np.ndarray]:
    """Split ``calib`` into batches of at most ``size``. ORT's histogram calibrators (entropy, percentile) stack
    the outputs of every batch into one array, so their batches must all have the same length: the largest
    divisor of the image count that is at most ``size``."""
    size = max(1, min(int(size), len(calib)))
    if equal:
        size = max(d for d in range(1, size + 1) if len(calib) % d == 0)
    return [calib[i:i + size] for i in range(0, len(calib), size)]


def _reader(qz, input_name: str, batches: list[np.ndarray]):
    """An ORT CalibrationDataReader over in-memory batches (the class is made here: ORT is imported lazily)."""

    class Reader(qz.CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._it = iter(batches)

        def __len__(self) -> int:
            return len(batches)

    return Reader()
