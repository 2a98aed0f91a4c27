"""ONNX Runtime runner: CPU, CUDA and TensorRT execution providers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import lazy_import
from edge_tl.device.runtime.base import BaseRunner, Loader, TensorMeta, resolve

ort = lazy_import("onnxruntime", "the ONNX Runtime backend")

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class SessionFromOnnx(Loader):
    """Creates an ``onnxruntime.InferenceSession`` from a path or serialized bytes, when called."""

    def __init__(self, model: str | Path | bytes, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None):
        self.model = model
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
        opts = ort.SessionOptions()
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

    def __init__(self, session: Any | Callable[[], Any], backend: str = "ort-cpu", name: str | None = None):
        self.backend = backend
        super().__init__(name)
        self._session_src = session
        self.session = None

    @classmethod
    def from_path(cls, model: str | Path, backend: str = "ort-cpu", intra_op_threads: int | None = None,
                  name: str | None = None) -> OnnxRuntimeRunner:
        if backend not in PROVIDERS:
            raise EdgeTLError(f"unknown ONNX Runtime backend '{backend}'", f"choose one of {list(PROVIDERS)}")
        return cls(SessionFromOnnx(model, PROVIDERS[backend], intra_op_threads), backend=backend, name=name)

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
        info: dict[str, Any] = {"onnxruntime": ort.__version__}
        if self.session is not None:
            info["providers"] = self.session.get_providers()
        return info


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}
