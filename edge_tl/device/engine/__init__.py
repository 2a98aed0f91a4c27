"""TensorRT engines: built on the target, cached by what they depend on, checked against the workstation.

- :mod:`~edge_tl.device.engine.build`: the TensorRT Python API build (lazy loaders ``NetworkFromOnnx``, ``BuildEngine``,
  ``EngineFromPath``), one code path for TensorRT 8.5 and 10.x.
- :mod:`~edge_tl.device.engine.trtexec`: the same build through ``trtexec``, and :func:`parse_trtexec`, the public
  parser of its performance summary (TensorRT 7.x, 8.x, 10.x).
- :mod:`~edge_tl.device.engine.cache`: :class:`EngineKey`, sidecar JSON files, :func:`load_or_build`.
- :mod:`~edge_tl.device.engine.parity`: the parity gate, :func:`check_parity` -> :class:`ParityReport`.
- :mod:`~edge_tl.device.engine.fallback`: INT8 layer fallback and the sensitivity ranking.

Importing this package imports neither TensorRT nor ONNX Runtime.
"""

from edge_tl.device.engine.cache import EngineKey, load_or_build
from edge_tl.device.engine.parity import ParityReport, ParityThresholds, check_parity
from edge_tl.device.engine.spec import BatchProfile, BuildSpec, DeviceInfo
from edge_tl.device.engine.trtexec import parse_trtexec

__all__ = ["BatchProfile", "BuildSpec", "DeviceInfo", "EngineKey", "ParityReport", "ParityThresholds",
           "check_parity", "load_or_build", "parse_trtexec"]
