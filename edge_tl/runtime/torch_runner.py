"""PyTorch backend ("torch"): eager baselines on the workstation, and ``.pt2`` files from a build run.

Workstation-only: this module imports torch. ``edge_tl.runtime`` never imports it; the factory does, lazily,
when ``backend="torch"`` is asked for. A ``.pt2`` is a ``torch.export`` ExportedProgram with a dynamic batch
dimension, written by :func:`save_exported` (the build keeps one in its run folder; bundles hold ONNX only).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_tl.errors import EdgeTLError
from edge_tl.runtime.base import BaseRunner, TensorMeta

META_FILE = "edge_tl.json"  # extra file inside the .pt2: input size and tensor names


class TorchRunner(BaseRunner):
    """Runs an ``nn.Module`` (or a callable returning one) on CPU or CUDA.

    ``infer`` is synchronous: on CUDA it calls ``torch.cuda.synchronize()`` before returning, so timing
    around it is honest. ``threads`` sets PyTorch's intra-op threads while the runner is active.
    """

    backend = "torch"

    def __init__(self, model: nn.Module | Callable[[], nn.Module], device: str = "auto", threads: int | None = None,
                 input_size: Sequence[int] | None = None, input_name: str = "input", output_name: str = "logits",
                 name: str | None = None):
        super().__init__(name)
        self._model_src = model
        self.device_name = device
        self.threads = threads
        self.input_size = tuple(input_size) if input_size else None
        self.input_name = input_name
        self.output_name = output_name
        self.model: nn.Module | None = None
        self._old_threads: int | None = None

    def activate_impl(self) -> None:
        device = self.device_name
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EdgeTLError("the torch backend was asked for CUDA but no CUDA GPU is visible", "use device='cpu'")
        self.device = torch.device(device)
        model = self._model_src if isinstance(self._model_src, nn.Module) else self._model_src()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # exported modules refuse .eval()
            model.eval()
        self.model = model.to(self.device)
        if self.threads:
            self._old_threads = torch.get_num_threads()
            torch.set_num_threads(int(self.threads))

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if set(feed) != {self.input_name}:
            raise EdgeTLError(f"unknown input(s) {sorted(feed)}; the model takes ['{self.input_name}']",
                              "name the inputs as the model does")
        x = torch.from_numpy(np.ascontiguousarray(feed[self.input_name], dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            out = self.model(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return {self.output_name: out.detach().float().cpu().numpy()}

    def get_input_metadata_impl(self) -> list[TensorMeta]:
        shape = (None, 3, *self.input_size) if self.input_size else (None, 3, None, None)
        return [TensorMeta(self.input_name, shape, "float32")]

    def deactivate_impl(self) -> None:
        self.model = None
        if self._old_threads is not None:
            torch.set_num_threads(self._old_threads)
            self._old_threads = None

    def describe_impl(self) -> dict[str, Any]:
        info: dict[str, Any] = {"torch": torch.__version__, "threads": self.threads or torch.get_num_threads()}
        if self.is_active:
            info["device"] = str(self.device)
            if self.device.type == "cuda":
                info["gpu"] = torch.cuda.get_device_name(self.device)
        return info


def save_exported(model: nn.Module, path: str | Path, input_size: Sequence[int] = (224, 224), *,
                  max_batch: int = 1024, input_name: str = "input", output_name: str = "logits") -> Path:
    """Write ``model`` (a CPU eval copy) as a ``torch.export`` program with a dynamic batch dim; atomic."""
    path = Path(path)
    h, w = (int(s) for s in input_size)
    module = copy.deepcopy(model).cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    # batch 2 in the example: torch.export specialises sizes 0 and 1
    with torch.no_grad():
        program = torch.export.export(module, (torch.zeros(2, 3, h, w),), dynamic_shapes=({0: batch},))
    meta = json.dumps({"input_size": [h, w], "input_name": input_name, "output_name": output_name})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        from edge_tl.fsutil import chmod_default

        chmod_default(tmp, directory=False)
        torch.export.save(program, tmp, extra_files={META_FILE: meta})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """(module, metadata) from a ``.pt2`` written by :func:`save_exported`."""
    extra = {META_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # torch raises several types for a bad archive
        raise EdgeTLError(f"{path} is not a readable torch.export program ({type(exc).__name__}: {exc})",
                          "use the model.pt2 of a build run folder") from exc
    meta = json.loads(extra[META_FILE]) if extra[META_FILE] else {}
    return program.module(), meta


def make_torch_runner(path: str | Path, threads: int | None = None, device: str = "auto") -> TorchRunner:
    """A (not yet activated) TorchRunner for a ``.pt2`` file; refuses ONNX files and bundles."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise EdgeTLError(f"the torch backend runs PyTorch programs (.pt2), not {path.name}",
                          "give the model.pt2 from a build run folder, or use --backend ort-cpu for ONNX/bundles")
    if not path.is_file():
        raise EdgeTLError(f"{path} does not exist", "give the model.pt2 from a build run folder")
    def load() -> nn.Module:
        module, found = load_exported(path)
        runner.input_size = tuple(found["input_size"]) if found.get("input_size") else None
        runner.input_name = found.get("input_name", "input")
        runner.output_name = found.get("output_name", "logits")
        return module

    runner = TorchRunner(load, device=device, threads=threads, name=f"torch:{path.name}")
    return runner  # load() fills in the input size and names when the runner activates
