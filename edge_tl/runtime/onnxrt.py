"""ONNX Runtime runner: CPU, CUDA and TensorRT execution providers.

Q/DQ (INT8) models, two ways (``qdq``):

- ``"kernels"`` (ONNX Runtime's default): ORT fuses each DequantizeLinear -> op -> QuantizeLinear group into its
  own integer kernels (QLinearConv, ...). Their numerics depend on the CPU's instruction set: without AVX-512
  VNNI, x86 kernels keep 16-bit saturating intermediates and a MobileNetV3 lost 14.6 points of top-1 on an
  AVX2-only AMD EPYC that it kept on a VNNI Xeon. This is what ORT CPU *latency* measures.
- ``"float"``: session config ``session.disable_quant_qdq = 1`` (onnxruntime/core/session/
  onnxruntime_session_options_config_keys.h, kOrtSessionOptionsDisableQuantQDQ): no Q/DQ fusion, so every
  QuantizeLinear/DequantizeLinear runs as written (round half to even, saturate, rescale) between float ops.
  That is what TensorRT's explicit quantization computes (to float rounding), on every CPU; every INT8
  *accuracy* on a workstation is measured this way (tests/test_float_qdq.py checks it against ONNX's
  pure-numpy reference evaluator). A model with an op that only has an integer kernel (QLinearConv,
  ConvInteger, ...) or an op from another domain is refused, naming the node, never run on the kernel path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl._optional import lazy_import
from edge_tl.errors import EdgeTLError
from edge_tl.runtime.base import BaseRunner, Loader, TensorMeta, resolve

ort = lazy_import("onnxruntime", "the ONNX Runtime backend")

QDQ_MODES = ("kernels", "float")

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class SessionFromOnnx(Loader):
    """Creates an ``onnxruntime.InferenceSession`` from a path or serialized bytes, when called."""

    def __init__(self, model: str | Path | bytes, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None, qdq: str = "kernels"):
        if qdq not in QDQ_MODES:
            raise EdgeTLError(f"unknown Q/DQ mode '{qdq}'", f"choose one of: {', '.join(QDQ_MODES)}")
        self.model = model
        self.qdq = qdq
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads

    def __call__(self):
        if isinstance(self.model, (str, Path)) and not Path(self.model).is_file():
            raise EdgeTLError(f"model {self.model} does not exist", "give the path of an .onnx file or a bundle")
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise EdgeTLError(f"ONNX Runtime here lacks {', '.join(missing)} (it has {', '.join(available)})",
                              "choose --backend ort-cpu, or install onnxruntime-gpu built for this device")
        if self.qdq == "float":
            from edge_tl.quantize import check_float_qdq

            check_float_qdq(self.model)
        opts = ort.SessionOptions()
        if self.qdq == "float":
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads:
            opts.inter_op_num_threads = self.inter_op_threads
        model = str(self.model) if isinstance(self.model, Path) else self.model
        try:
            return ort.InferenceSession(model, sess_options=opts, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types for bad models
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgeTLError(f"ONNX Runtime could not load {self.model}: {first}",
                              "check the file is a valid ONNX model (rebuild the bundle)") from exc


class OnnxRuntimeRunner(BaseRunner):
    """Runs an ONNX model with ONNX Runtime. ``session`` is a session or a callable that makes one."""

    def __init__(self, session: Any | Callable[[], Any], backend: str = "ort-cpu", name: str | None = None,
                 qdq: str = "kernels"):
        self.backend = backend
        self.qdq = qdq
        super().__init__(name)
        self._session_src = session
        self.session = None

    @classmethod
    def from_path(cls, model: str | Path, backend: str = "ort-cpu", intra_op_threads: int | None = None,
                  name: str | None = None, qdq: str = "kernels") -> OnnxRuntimeRunner:
        """``qdq="float"``: Q/DQ evaluated as written, in float (INT8 accuracy as TensorRT computes it; see
        the module doc); ``"kernels"``: ONNX Runtime's fused integer kernels (ORT CPU latency)."""
        if backend not in PROVIDERS:
            raise EdgeTLError(f"unknown ONNX Runtime backend '{backend}'", f"choose one of {list(PROVIDERS)}")
        return cls(SessionFromOnnx(model, PROVIDERS[backend], intra_op_threads, qdq=qdq), backend=backend,
                   name=name, qdq=qdq)

    def activate_impl(self) -> None:
        self.session = resolve(self._session_src)
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._inputs = {i.name: i for i in self.session.get_inputs()}

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = set(feed) - set(self._inputs)
        if unknown:
            raise EdgeTLError(f"unknown input(s) {sorted(unknown)}; the model takes {sorted(self._inputs)}",
                              "name the inputs as the model does")
        outs = self.session.run(self._output_names, dict(feed))
        return dict(zip(self._output_names, outs, strict=True))

    def get_input_metadata_impl(self) -> list[TensorMeta]:
        return [TensorMeta(i.name, tuple(d if isinstance(d, int) else None for d in i.shape),
                           _ORT_DTYPES.get(i.type, i.type)) for i in self._inputs.values()]

    def deactivate_impl(self) -> None:
        self.session = None

    def describe_impl(self) -> dict[str, Any]:
        info: dict[str, Any] = {"onnxruntime": ort.__version__, "qdq": self.qdq}
        if self.session is not None:
            info["providers"] = self.session.get_providers()
        return info


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}
