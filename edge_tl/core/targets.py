"""Device targets and what their TensorRT accepts.

Sources (maximum ONNX opset of each TensorRT's bundled ONNX parser):
- TensorRT 8.5 (JetPack 5.1.x): onnx-tensorrt ``release/8.5-GA`` docs/operators.md,
  "TensorRT 8.5 supports operators up to Opset 17".
- TensorRT 8.6 (JetPack 6.0 DP/GA): onnx-tensorrt ``release/8.6-GA`` docs/operators.md, "up to Opset 17".
- TensorRT 10.3 (JetPack 6.1 / 6.2): onnx-tensorrt ``release/10.3-GA`` docs/operators.md,
  "opset 9 to opset 20".
JetPack -> TensorRT / CUDA / Python: NVIDIA's JetPack release notes (5.1.2: L4T R35.4.1, TRT 8.5.2, CUDA 11.4,
Python 3.8; 6.0: R36.3, TRT 8.6.2, CUDA 12.2; 6.1/6.2: R36.4, TRT 10.3, CUDA 12.6, Python 3.10).
INT8 explicit quantization (Q/DQ) is supported from TensorRT 8.0; Orin's GPU is compute capability 8.7.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edge_tl.core.errors import EdgeTLError


@dataclass(frozen=True)
class Target:
    name: str
    jetpack: str
    l4t: str
    tensorrt: str
    cuda: str
    python: str
    max_opset: int
    # The opset we export with: the newest one every tool in the chain (torch.onnx, ORT quantization,
    # this TensorRT) handles well, never above max_opset.
    export_opset: int

    def as_dict(self) -> dict:
        return asdict(self)


TARGETS: dict[str, Target] = {
    "jetpack5": Target("jetpack5", "5.1.2", "R35.4.1", "8.5.2", "11.4", "3.8", max_opset=17, export_opset=17),
    "jetpack6.0": Target("jetpack6.0", "6.0", "R36.3", "8.6.2", "12.2", "3.10", max_opset=17, export_opset=17),
    "jetpack6": Target("jetpack6", "6.2", "R36.4", "10.3", "12.6", "3.10", max_opset=20, export_opset=17),
}
DEFAULT_TARGET = "jetpack6"


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise EdgeTLError(f"unknown target '{name}'", f"choose one of: {', '.join(TARGETS)}") from None


def max_opset_for_tensorrt(version: str) -> int | None:
    """The max opset of a TensorRT version string like '8.5.2.2' or '10.3.0'; None if unknown."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    if major >= 10:
        return 20
    if major == 8 and minor >= 5:
        return 17
    if major == 8:
        return 13 if minor < 2 else 15
    if major == 7:
        return 13 if minor >= 2 else 11
    return None
