"""What verifying a bundle on every open costs (issue 11): `Bundle.open` with and without the sha256 check, on a
bundle the size of a dense MobileNetV2 build (FP32 and INT8 ONNX of 9 MB each, 8 golden 224x224 images), and
the first vs a cached open of its .tar.gz. Writes the `bundle_verify` section of benchmarks/RESULTS.md.

The model files hold random bytes of the real sizes: opening a bundle hashes them, it does not parse them.

    .venv/bin/python benchmarks/bench_verify.py     (about 10 s; --quick, from run_all.py, changes nothing)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_line, write_section  # noqa: E402

from edge_tl.core.bundle import (  # noqa: E402
    FP32_MODEL,
    GOLDEN_INDEX,
    GOLDEN_INPUTS,
    GOLDEN_OUTPUTS,
    INT8_MODEL,
    LABELS,
    PREPROCESS,
    Bundle,
    DataSummary,
    GoldenInfo,
    Manifest,
    StageMetrics,
    TargetInfo,
    TensorSpec,
    utc_now,
    write_bundle,
)
from edge_tl.core.preprocess import PreprocessConfig  # noqa: E402

MODEL_BYTES = {FP32_MODEL: 8_930_000, INT8_MODEL: 9_110_000}  # benchmarks/RESULTS.md, backbones: mobilenet_v2
GOLDEN, CLASSES, RUNS = 8, 10, 15


def make_bundle(root: Path) -> Path:
    rng = np.random.default_rng(0)
    staging = root / "staging"
    (staging / "golden").mkdir(parents=True)
    for name, size in MODEL_BYTES.items():
        (staging / name).write_bytes(rng.bytes(size))
    classes = [f"class{i}" for i in range(CLASSES)]
    (staging / LABELS).write_text("\n".join(classes) + "\n")
    PreprocessConfig(input_size=(224, 224), resize=256).save(staging / PREPROCESS)
    np.save(staging / GOLDEN_INPUTS, rng.standard_normal((GOLDEN, 3, 224, 224)).astype(np.float32))
    np.save(staging / GOLDEN_OUTPUTS, rng.standard_normal((GOLDEN, CLASSES)).astype(np.float32))
    (staging / GOLDEN_INDEX).write_text("[]\n")
    manifest = Manifest(
        created=utc_now(), name="bench", target=TargetInfo(name="jetpack6", jetpack="6.2", tensorrt="10.3",
                                                           max_opset=20, opset=17),
        backbone="mobilenet_v2", weights="random", seed=0,
        input=TensorSpec(name="input", shape=["batch", 3, 224, 224]),
        output=TensorSpec(name="logits", shape=["batch", CLASSES]), classes=classes,
        data=DataSummary(source="synthetic", split_mode="stratified", counts={}, file_list_sha256="0" * 64),
        stages={"finetune": StageMetrics()}, golden=GoldenInfo(count=GOLDEN))
    return write_bundle(staging, manifest, root / "bundle")


def timed(fn, runs: int = RUNS) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main() -> None:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        os.environ["EDGE_TL_BUNDLE_CACHE"] = str(root / "cache")
        bundle = make_bundle(root)
        tarball = bundle.with_name("bundle.tar.gz")
        total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
        plain = timed(lambda: Bundle.open(bundle, verify=False))
        verified = timed(lambda: Bundle.open(bundle))
        t0 = time.perf_counter()
        Bundle.open(tarball)  # unpacks into the cache
        first_tar = (time.perf_counter() - t0) * 1e3
        cached_tar = timed(lambda: Bundle.open(tarball))
    mb = total / 1e6
    rate = mb / ((verified - plain) / 1e3)
    body = f"""## Verifying a bundle on every open (benchmarks/bench_verify.py, issue 11)

{machine_line()}
Bundle the size of a dense MobileNetV2 build: {mb:.1f} MB in all (FP32 and INT8 ONNX of 8.9 and 9.1 MB, {GOLDEN}
golden 224x224 inputs). Median of {RUNS} opens each, files in the page cache. 1-minute load average at the start:
{load:.2f} (other jobs shared the 2 vCPUs: read the numbers as upper bounds).

| open | median ms |
|---|---:|
| folder, manifest only (`verify=False`) | {plain:.2f} |
| folder, every artifact's sha256 checked (what every command does) | {verified:.2f} |
| .tar.gz, first open (sha256 of the archive, unpack into the cache, verify) | {first_tar:.2f} |
| .tar.gz, later opens (sha256 of the archive, cached folder verified again) | {cached_tar:.2f} |

Hashing runs at about {rate:.0f} MB/s here. Not measured on a Jetson: an Orin Nano's Cortex-A78AE cores have the
ARMv8 SHA-256 instructions OpenSSL uses, so the same {mb:.0f} MB should take tens of milliseconds there, once per
command start (or per `serve` model load); no size+mtime cache was added for that.
"""
    print(body)
    write_section("bundle_verify", body)


if __name__ == "__main__":
    main()
