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

import contextlib
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import lazy_import
from edge_tl.core.qdq import check_float_qdq
from edge_tl.device.runtime.base import BaseRunner, Loader, TensorMeta, resolve

ort = lazy_import("onnxruntime", "the ONNX Runtime backend")
log_ = logging.getLogger("edge_tl.device.runtime")

QDQ_MODES = ("kernels", "float")

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort_trt_cache_dir() -> Path:
    """Where ONNX Runtime's TensorRT provider keeps its engines and timing cache: ``$EDGE_TL_ORT_TRT_CACHE``, else
    ``$XDG_CACHE_HOME/edge-tl/ort-trt``."""
    env = os.environ.get("EDGE_TL_ORT_TRT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "edge-tl" / "ort-trt"


def tensorrt_provider_options(model: str | Path | bytes) -> dict[str, Any]:
    """The TensorRT execution provider's options for ``model`` (issue 22, D5; names from ONNX Runtime's "TensorRT
    Execution Provider" documentation):

    * ``trt_int8_enable`` for a Q/DQ model: TensorRT 8.x builds an explicitly quantized network in INT8 only with
      the INT8 flag set (microsoft/onnxruntime#13381); without it the EP builds it in FP32.
    * ``trt_engine_cache_enable`` / ``trt_engine_cache_path`` and ``trt_timing_cache_enable`` /
      ``trt_timing_cache_path``: without them every session rebuilds its engine (minutes on an Orin Nano)."""
    from edge_tl.core.qdq import QDQ_OPS

    qdq = False
    if isinstance(model, (str, Path)) and Path(model).is_file():
        import onnx

        qdq = any(n.op_type in QDQ_OPS for n in onnx.load(str(model), load_external_data=False).graph.node)
    cache = ort_trt_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return {"trt_int8_enable": qdq, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """What ONNX Runtime's C++ logger writes to fd 2 meanwhile (why a provider failed to load), plus Python
    warnings; the captured text is written to the real stderr afterwards, so nothing is hidden."""
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            if text:
                sys.stderr.write(text)
            lines += [str(w.message) for w in caught] + text.splitlines()


_STDERR_LOCK = threading.Lock()


def _provider_reason(lines: list[str], provider: str) -> str:
    """The line in ONNX Runtime's log that says why ``provider`` did not load (short name or 'Failed to')."""
    short = provider.removesuffix("ExecutionProvider").lower()
    for line in lines:
        low = line.lower()
        if provider.lower() in low or ("failed" in low and short in low):
            return line.strip()[:400]
    for line in lines:
        if "failed to load" in line.lower() or "error" in line.lower():
            return line.strip()[:400]
    return "ONNX Runtime gave no reason"


class SessionFromOnnx(Loader):
    """Creates an ``onnxruntime.InferenceSession`` from a path or serialized bytes, when called.

    ONNX Runtime lists GPU providers it then fails to load and quietly runs the session on the CPU
    (microsoft/onnxruntime#13414, #23372), so after creating the session its ``get_providers()`` is compared with
    what was asked: a missing provider is refused with ONNX Runtime's own reason, unless ``allow_fallback`` -
    then the provider that really runs is recorded (``providers_used`` / ``fell_back``).
    """

    def __init__(self, model: str | Path | bytes, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 allow_fallback: bool = False, qdq: str = "kernels"):
        if qdq not in QDQ_MODES:
            raise EdgeTLError(f"unknown Q/DQ mode '{qdq}'", f"choose one of: {', '.join(QDQ_MODES)}")
        self.model = model
        self.qdq = qdq
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.allow_fallback = allow_fallback
        self.providers_used: list[str] | None = None
        self.fell_back: str | None = None

    def _provider_args(self) -> list[Any]:
        """The providers as ONNX Runtime takes them: TensorRT's with its options (:func:`tensorrt_provider_options`)."""
        return [(p, tensorrt_provider_options(self.model)) if p == "TensorrtExecutionProvider" else p
                for p in self.providers]

    def __call__(self):
        if isinstance(self.model, (str, Path)) and not Path(self.model).is_file():
            raise EdgeTLError(f"model {self.model} does not exist", "give the path of an .onnx file or a bundle")
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise EdgeTLError(f"ONNX Runtime here lacks {', '.join(missing)} (it has {', '.join(available)})",
                              "choose --backend ort-cpu, or install onnxruntime-gpu built for this device")
        if self.qdq == "float":
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
            with _captured_stderr() as log:
                session = ort.InferenceSession(model, sess_options=opts, providers=self._provider_args())
        except Exception as exc:  # ORT raises its own exception types for bad models
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgeTLError(f"ONNX Runtime could not load {self.model}: {first}",
                              "check the file is a valid ONNX model (rebuild the bundle)") from exc
        used = list(session.get_providers())
        self.providers_used = used
        missing = [p for p in self.providers if p not in used and p != "CPUExecutionProvider"]
        if missing:
            wanted = missing[0]
            reason = _provider_reason(log, wanted)
            if not self.allow_fallback:
                raise EdgeTLError(f"ONNX Runtime did not load {wanted} (the session would run on "
                                  f"{', '.join(used)}): {reason}", "install the CUDA/TensorRT libraries that "
                                  "onnxruntime-gpu needs (edge-tl doctor), or choose --backend ort-cpu")
            self.fell_back = f"{wanted} did not load ({reason}); running on {used[0]}"
            log_.warning("FALLBACK: %s", self.fell_back)
        return session


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
                  name: str | None = None, allow_fallback: bool = False, qdq: str = "kernels") -> OnnxRuntimeRunner:
        """``qdq="float"``: Q/DQ evaluated as written, in float (INT8 accuracy as TensorRT computes it; see
        the module doc); ``"kernels"``: ONNX Runtime's fused integer kernels (ORT CPU latency)."""
        if backend not in PROVIDERS:
            raise EdgeTLError(f"unknown ONNX Runtime backend '{backend}'", f"choose one of {list(PROVIDERS)}")
        return cls(SessionFromOnnx(model, PROVIDERS[backend], intra_op_threads, allow_fallback=allow_fallback,
                                   qdq=qdq), backend=backend, name=name, qdq=qdq)

    def activate_impl(self) -> None:
        self.session = resolve(self._session_src)
        src = self._session_src
        self.providers_requested = list(getattr(src, "providers", []) or [])
        self.fell_back = getattr(src, "fell_back", None)
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
            info["providers"] = self.session.get_providers()  # what really runs
            info["providers_requested"] = getattr(self, "providers_requested", None)
            if getattr(self, "fell_back", None):
                info["fell_back"] = self.fell_back
        return info


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}
