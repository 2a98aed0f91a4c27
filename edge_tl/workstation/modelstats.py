"""Model statistics for the build report: MACs/params (Torch-Pruning's counter), ONNX top-1, CPU latency.

Workstation-only (imports torch). Latency numbers are medians of single-batch runs; they are for the
report and the benchmarks, never for test assertions.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_tl.core.errors import EdgeTLError


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op threads for the block (None: leave PyTorch's setting alone)."""
    if not threads:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_size(input_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(s) for s in input_size)
    if len(size) != 2 or min(size) < 1:
        raise EdgeTLError(f"input size {tuple(input_size)} is not (height, width)", "give two positive integers")
    return size  # type: ignore[return-value]


def count_macs_params(model: nn.Module, input_size: Sequence[int] = (224, 224)) -> tuple[int, int]:
    """(MACs, parameters) of one image of ``input_size`` through ``model`` (Torch-Pruning's op counter)."""
    import torch_pruning as tp

    h, w = _check_size(input_size)
    example = torch.zeros(1, 3, h, w, device=_device_of(model))
    with eval_mode(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def onnx_top1(path: str | Path, inputs: np.ndarray, labels: Sequence[int] | np.ndarray, batch: int = 64,
              threads: int | None = None, qdq: str = "float") -> float:
    """Top-1 accuracy (0..1) of an ONNX classifier on preprocessed ``inputs`` (N,3,H,W) with ONNX Runtime CPU.

    A Q/DQ (INT8) model is evaluated with Q/DQ in float (``qdq="float"``: as TensorRT computes it, the same on
    every CPU); ``qdq="kernels"`` measures ONNX Runtime's CPU integer kernels instead (CPU-dependent)."""
    from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner

    labels = np.asarray(labels).reshape(-1)
    if len(inputs) == 0:
        raise EdgeTLError("no images to measure accuracy on", "check the test split is not empty")
    if len(inputs) != len(labels):
        raise EdgeTLError(f"{len(inputs)} inputs but {len(labels)} labels", "give one label per input")
    correct = 0
    with OnnxRuntimeRunner.from_path(path, "ort-cpu", intra_op_threads=threads, qdq=qdq) as runner:
        name = runner.get_input_metadata()[0].name
        for start in range(0, len(inputs), max(1, batch)):
            chunk = np.ascontiguousarray(inputs[start:start + batch], dtype=np.float32)
            logits = next(iter(runner.infer({name: chunk}).values()))
            correct += int((logits.argmax(axis=1) == labels[start:start + batch]).sum())
    return correct / len(labels)


def onnx_latency_ms(path: str | Path, input_size: Sequence[int] = (224, 224), iters: int = 200, warmup: int = 20,
                    threads: int | None = None) -> float:
    """Median latency (ms) of one batch-1 inference of an ONNX model with ONNX Runtime CPU (for a Q/DQ model:
    ONNX Runtime's CPU integer kernels, its default)."""
    from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner

    h, w = _check_size(input_size)
    x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
    times = []
    with OnnxRuntimeRunner.from_path(path, "ort-cpu", intra_op_threads=threads) as runner:
        feed = {runner.get_input_metadata()[0].name: x}
        for _ in range(max(0, warmup)):
            runner.infer(feed)
        for _ in range(max(1, iters)):
            runner.infer(feed)
            times.append(runner.last_inference_ns / 1e6)
    return statistics.median(times)


def torch_latency_ms(model: nn.Module, input_size: Sequence[int] = (224, 224), iters: int = 200, warmup: int = 20,
                     threads: int | None = None) -> float:
    """Median latency (ms) of one batch-1 eager forward in ``torch.inference_mode`` (CUDA is synchronised)."""
    h, w = _check_size(input_size)
    device = _device_of(model)
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch_threads(threads), eval_mode(model), torch.inference_mode():
        for _ in range(max(0, warmup)):
            model(x)
        sync()
        for _ in range(max(1, iters)):
            start = time.perf_counter_ns()
            model(x)
            sync()
            times.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(times)
