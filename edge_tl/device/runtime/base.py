"""One runner lifecycle for every backend (after Polygraphy's ``backend/base/runner.py``).

``activate() / infer() / deactivate()``, each delegating to an ``*_impl`` hook, and a context manager.
The bench loop, the parity gate, ``infer`` and ``serve`` only ever see :class:`BaseRunner`.

``infer`` is synchronous: when it returns, the outputs are in host memory (a GPU runner synchronises its
stream inside ``infer_impl``), so timing around it is honest.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from edge_tl.core.errors import EdgeTLError, InternalError

T = TypeVar("T")


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int | str | None, ...]  # None or a str for a dynamic axis
    dtype: str


class Loader(Generic[T]):
    """A deferred step that produces an object: called only when a runner activates (Polygraphy-style).

    Loaders compose: ``SessionFromOnnx(path)`` or ``BuildEngine(NetworkFromOnnx(path))``.
    """

    def __call__(self) -> T:  # pragma: no cover - interface
        raise NotImplementedError


def resolve(obj_or_callable: T | Callable[[], T]) -> T:
    """Accept an object or a callable (e.g. a Loader) returning one."""
    return obj_or_callable() if callable(obj_or_callable) else obj_or_callable


class BaseRunner(abc.ABC):
    """Base class of every inference backend."""

    #: short backend id, e.g. "ort-cpu", "tensorrt", "torch"
    backend: str = "base"

    def __init__(self, name: str | None = None):
        self.name = name or self.backend
        self.is_active = False
        self.last_inference_ns: int | None = None
        self.inference_count = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    def activate(self) -> BaseRunner:
        if self.is_active:
            raise InternalError(f"runner {self.name} is already active")
        self.activate_impl()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def __enter__(self) -> BaseRunner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- inference ----------------------------------------------------------------------------------
    def infer(self, feed: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch. ``feed`` maps input names to arrays, or is one array for a one-input model."""
        if not self.is_active:
            raise InternalError(f"runner {self.name} must be activated before infer()")
        if isinstance(feed, np.ndarray):
            names = [m.name for m in self.get_input_metadata()]
            if len(names) != 1:
                raise EdgeTLError(f"model has inputs {names}; pass a dict of arrays", "name every input")
            feed = {names[0]: feed}
        start = time.perf_counter_ns()
        out = self.infer_impl(feed)
        self.last_inference_ns = time.perf_counter_ns() - start
        self.inference_count += 1
        return out

    def get_input_metadata(self) -> list[TensorMeta]:
        if not self.is_active:
            raise InternalError(f"runner {self.name} must be activated before get_input_metadata()")
        return self.get_input_metadata_impl()

    def static_batch(self) -> int | None:
        """The one batch size the model takes when its inputs have a fixed first axis (a DLA engine, a static
        ONNX export), else None. Parity and bench feed exactly this batch."""
        batches = {m.shape[0] if m.shape and isinstance(m.shape[0], int) else None
                   for m in self.get_input_metadata()}
        return batches.pop() if len(batches) == 1 and None not in batches else None

    def describe(self) -> dict[str, Any]:
        """Backend, device and library versions, for results files."""
        return {"backend": self.backend, "name": self.name, **self.describe_impl()}

    # -- hooks --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def get_input_metadata_impl(self) -> list[TensorMeta]: ...

    def deactivate_impl(self) -> None:
        """Release resources; default: nothing."""

    def describe_impl(self) -> dict[str, Any]:
        return {}
