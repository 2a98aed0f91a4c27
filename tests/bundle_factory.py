"""A real, tiny bundle built without torch, for the device-side tests (bench, engine, deploy, serve).

The model is a small conv net written with onnx.helper (Conv-ReLU-Conv-ReLU-GlobalAveragePool-Gemm), its
INT8 twin comes from ONNX Runtime's quantize_static (QDQ, symmetric, per-channel), and the golden outputs
are what ONNX Runtime computes. Everything goes through edge_tl.core.bundle.write_bundle, like a real build.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edge_tl.core.bundle import (
    FP32_MODEL,
    GOLDEN_INDEX,
    GOLDEN_INPUTS,
    GOLDEN_INPUTS_FLOAT,
    GOLDEN_INT8_OUTPUTS,
    GOLDEN_OUTPUTS,
    INT8_MODEL,
    LABELS,
    POSTPROCESS,
    PREPROCESS,
    DataSummary,
    GoldenInfo,
    Manifest,
    StageMetrics,
    TargetInfo,
    TensorSpec,
    utc_now,
    write_bundle,
)
from edge_tl.core.parity import derive_tolerances
from edge_tl.core.postprocess import PostprocessConfig
from edge_tl.core.preprocess import PreprocessConfig, Preprocessor

CLASSES = ["circle", "square", "triangle", "cross"]


def tiny_onnx(path: Path, size: int = 16, num_classes: int = 4, seed: int = 0, opset: int = 17) -> Path:
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (8,)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (16,)).astype(np.float32)
    wf = rng.normal(0, 0.5, (num_classes, 16)).astype(np.float32)
    bf = rng.normal(0, 0.1, (num_classes,)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (wf, "wf"), (bf, "bf")]]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def quantize_qdq(fp32: Path, int8: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return int8


def make_images(n: int, seed: int = 0, size: int = 24) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)) for _ in range(n)]


def qdq_float_outputs(model: Path, inputs: np.ndarray) -> np.ndarray:
    """A Q/DQ model's outputs evaluated in float (the INT8 reference, as the build computes it)."""
    from edge_tl.device.runtime.onnxrt import OnnxRuntimeRunner

    with OnnxRuntimeRunner.from_path(model, "ort-cpu", qdq="float") as runner:
        return next(iter(runner.infer(inputs).values())).astype(np.float32)


def make_tiny_bundle(out_dir: Path, *, name: str = "tiny", seed: int = 0, size: int = 16, golden: int = 6,
                     broken_int8: bool = False, tarball: bool = True, temperature: float | None = None,
                     schema: int = 4, stages: dict[str, StageMetrics] | None = None, sign_key="session",
                     ood=None, drift=None) -> Path:
    """Write a complete bundle to ``out_dir`` (which must not exist). ``broken_int8`` ships an INT8 model with
    other weights (the INT8 reference stays the genuine model's), so a parity gate on it must fail while every hash
    still matches. ``temperature``: a calibrated temperature in postprocess.json (None: write_bundle's default,
    temperature 1, not fitted). ``schema`` 2 writes the old golden set (float inputs, no INT8 reference).
    ``stages``: the manifest's stage metrics (e.g. a failed chance check). ``sign_key``: an Ed25519 private key
    that signs it (edge_tl.core.signing); "session" (default): the tests' session key, which the tests' devices
    trust (tests/conftest.py); None: unsigned (schema < 4 bundles are never signed). ``ood``: an OODRule for
    postprocess.json (edge_tl.core.postprocess),
    ``drift`` a DriftReference (edge_tl.core.drift)."""
    import onnxruntime as ort

    pre_cfg = PreprocessConfig(input_size=(size, size), resize=size + 2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    pre = Preprocessor(pre_cfg)
    with tempfile.TemporaryDirectory() as td:
        staging = Path(td) / "staging"
        (staging / "golden" / "images").mkdir(parents=True)
        tiny_onnx(staging / FP32_MODEL, size=size, num_classes=len(CLASSES), seed=seed)
        calib = pre.batch(make_images(16, seed=seed + 100))
        genuine = quantize_qdq(staging / FP32_MODEL, Path(td) / "genuine.int8.onnx", calib)
        if broken_int8:
            quantize_qdq(tiny_onnx(Path(td) / "other.onnx", size=size, seed=seed + 7), staging / INT8_MODEL, calib)
        else:
            staging.joinpath(INT8_MODEL).write_bytes(genuine.read_bytes())
        (staging / LABELS).write_text("\n".join(CLASSES) + "\n")
        pre_cfg.save(staging / PREPROCESS)
        if temperature is not None or ood is not None or drift is not None:
            PostprocessConfig(temperature=temperature or 1.0, fitted_on="tests", ood=ood,
                              drift=drift).save(staging / POSTPROCESS)
        images = make_images(golden, seed=seed)
        index = []
        for i, img in enumerate(images):
            fname = f"golden/images/{i:03d}.png"
            img.save(staging / fname)
            index.append({"file": fname, "label": i % len(CLASSES), "label_name": CLASSES[i % len(CLASSES)]})
        crops = np.stack([np.asarray(pre.resize_crop(img)) for img in images])
        inputs = np.stack([pre.normalize(c) for c in crops])
        sess = ort.InferenceSession(str(staging / FP32_MODEL), providers=["CPUExecutionProvider"])
        outputs = sess.run(None, {"input": inputs})[0].astype(np.float32)
        np.save(staging / GOLDEN_OUTPUTS, outputs)
        if schema >= 3:
            np.save(staging / GOLDEN_INPUTS, crops)
            reference = qdq_float_outputs(genuine, inputs)
            np.save(staging / GOLDEN_INT8_OUTPUTS, reference)
            tolerance, note = derive_tolerances(outputs, reference)
            info = GoldenInfo(count=golden, inputs=GOLDEN_INPUTS, outputs_int8=GOLDEN_INT8_OUTPUTS,
                              margin_tolerance=tolerance, tolerance_note=note)
        else:
            np.save(staging / GOLDEN_INPUTS_FLOAT, inputs)
            info = GoldenInfo(count=golden)
        (staging / GOLDEN_INDEX).write_text(json.dumps(index, indent=2))
        manifest = Manifest(
            schema_version=schema, created=utc_now(), name=name,
            target=TargetInfo(name="jetpack6", jetpack="6.2", tensorrt="10.3", max_opset=20, opset=17),
            backbone="tiny-cnn", weights="random", seed=seed,
            input=TensorSpec(name="input", shape=["batch", 3, size, size]),
            output=TensorSpec(name="logits", shape=["batch", len(CLASSES)]),
            max_batch=8, classes=CLASSES,
            data=DataSummary(source="synthetic", split_mode="stratified",
                             counts={"test": {c: 1 for c in CLASSES}}, file_list_sha256="0" * 64),
            stages=stages or {"finetune": StageMetrics(top1=0.25), "prune": StageMetrics(top1=0.25),
                              "quantize": StageMetrics(top1=0.25)},
            golden=info,
        )
        if isinstance(sign_key, str):
            sign_key = session_key() if schema >= 4 else None
        return write_bundle(staging, manifest, Path(out_dir), tarball=tarball, sign_key=sign_key)


def session_key():
    """The tests' signing key (tests/conftest.py made it; $EDGE_TL_SIGNING_KEY)."""
    from edge_tl.core.signing import default_key_path, load_private_key

    return load_private_key(default_key_path())


def _resign(bundle_dir: Path) -> None:
    """A signed bundle edited by a test is signed again with the session key (a new, genuine manifest); an
    unsigned one stays unsigned."""
    from edge_tl.core.signing import SIGNATURE, manifest_digest, sign_folder

    if (Path(bundle_dir) / SIGNATURE).is_file():
        data = json.loads((Path(bundle_dir) / "manifest.json").read_text())
        sign_folder(Path(bundle_dir), manifest_digest(data), session_key())


def reseal(bundle_dir: Path) -> Path:
    """Re-hash a bundle folder edited by a test (as a careless tool would): the manifest then vouches for the edit,
    so what is checked is the content, not the hashes."""
    from edge_tl.core.bundle import Bundle, seal_manifest

    seal_manifest(Path(bundle_dir), Bundle.open(bundle_dir, verify=False).manifest)
    _resign(bundle_dir)
    return Path(bundle_dir)


def rewrite_manifest(bundle_dir: Path, data: dict) -> Path:
    """Write an edited manifest with its bundle id recomputed (schema 4: the id covers the manifest), as a test
    that simulates another build's manifest (not a tampering) needs."""
    from edge_tl.core.bundle import MANIFEST
    from edge_tl.core.signing import manifest_digest

    if data.get("schema_version", 0) >= 4:
        data["bundle_id"] = manifest_digest(data)[:16]
    (Path(bundle_dir) / MANIFEST).write_text(json.dumps(data, indent=2))
    _resign(bundle_dir)
    return Path(bundle_dir)
