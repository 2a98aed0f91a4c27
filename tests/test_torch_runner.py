"""The PyTorch backend: TorchRunner over a module, .pt2 programs through the runner factory, clear refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs PyTorch (workstation stack)")
torchvision = pytest.importorskip("torchvision", reason="the test model comes from torchvision")

from edge_tl.core.errors import EdgeTLError, InternalError  # noqa: E402
from edge_tl.device.runners import create_runner  # noqa: E402
from edge_tl.workstation.torch_runner import TorchRunner, make_torch_runner, save_exported  # noqa: E402

SIZE = (32, 32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = torchvision.models.squeezenet1_1(num_classes=4)
    m.classifier[1].bias.data.fill_(0.5)  # logits away from ReLU's zero, so the comparison means something
    return m.eval()


@pytest.fixture(scope="module")
def pt2(model, tmp_path_factory):
    return save_exported(model, tmp_path_factory.mktemp("pt2") / "model.pt2", SIZE)


def reference(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_runner_over_a_module(model):
    x = np.random.default_rng(0).standard_normal((3, 3, *SIZE)).astype(np.float32)
    runner = TorchRunner(model, device="cpu", threads=1, input_size=SIZE)
    with pytest.raises(InternalError):
        runner.infer(x)
    threads = torch.get_num_threads()
    with runner:
        assert torch.get_num_threads() == 1
        out = runner.infer(x)["logits"]
        assert runner.get_input_metadata()[0].shape == (None, 3, *SIZE)
        info = runner.describe()
        assert (info["backend"], info["device"], info["threads"]) == ("torch", "cpu", 1)
        with pytest.raises(EdgeTLError, match="unknown input"):
            runner.infer({"image": x})
    assert torch.get_num_threads() == threads and not runner.is_active
    np.testing.assert_allclose(out, reference(model, x), rtol=1e-5, atol=1e-5)
    assert out.shape == (3, 4) and float(np.abs(out).max()) > 0.1


def test_runner_from_a_loader(model):
    calls = []

    def load():
        calls.append(1)
        return model

    runner = TorchRunner(load, device="cpu")
    assert calls == []  # loaders run at activation, not construction
    with runner:
        assert runner.infer(np.zeros((1, 3, *SIZE), np.float32))["logits"].shape == (1, 4)
    assert calls == [1]


def test_pt2_through_the_factory(model, pt2):
    rng = np.random.default_rng(1)
    with create_runner(pt2, backend="torch", threads=1) as runner:
        assert runner.get_input_metadata()[0].shape == (None, 3, *SIZE)
        for batch in (1, 3, 5):  # the batch dimension is dynamic
            x = rng.standard_normal((batch, 3, *SIZE)).astype(np.float32)
            # the exported program and eager may run other CPU kernels for the same op (its threads=1 against
            # torch's default, other shapes): float32 accumulation order then moves logits by up to 2.5e-4
            # (the lent GPU machine's 16-core CPU with torch 2.11, where 1e-4 failed); a wrong export is off by far more
            np.testing.assert_allclose(runner.infer(x)["logits"], reference(model, x), rtol=1e-3, atol=1e-3)
        assert runner.describe()["name"] == "torch:model.pt2"
    assert not list(pt2.parent.glob(".model.pt2*"))


def test_onnx_and_bundles_are_refused_by_the_torch_backend(tiny_bundle_src, tmp_path):
    with pytest.raises(EdgeTLError, match=r"torch backend runs PyTorch programs \(.pt2\), not model.onnx"):
        create_runner(tiny_bundle_src / "model.onnx", backend="torch")
    with pytest.raises(EdgeTLError, match="model.pt2 from a build run folder"):
        create_runner(tiny_bundle_src, backend="torch")
    with pytest.raises(EdgeTLError, match="does not exist"):
        make_torch_runner(tmp_path / "missing.pt2")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive")
    runner = make_torch_runner(bad)
    with pytest.raises(EdgeTLError, match="not a readable torch.export program"):
        runner.activate()


def test_cuda_request_without_a_gpu(model):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the refusal path cannot be exercised")
    with pytest.raises(EdgeTLError, match="no CUDA GPU"):
        TorchRunner(model, device="cuda").activate()


@pytest.mark.gpu
def test_cuda_runner_matches_cpu(model):
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with CUDA")
    x = np.random.default_rng(2).standard_normal((2, 3, *SIZE)).astype(np.float32)
    import copy

    with TorchRunner(copy.deepcopy(model), device="cuda") as runner:
        out = runner.infer(x)["logits"]
        assert runner.describe()["device"].startswith("cuda")
    np.testing.assert_allclose(out, reference(model, x), rtol=1e-3, atol=1e-3)


def test_importing_the_runtime_does_not_import_torch_runner():
    code = ("import sys, edge_tl.device.runtime, edge_tl.device.runners, edge_tl.device.runtime.onnxrt; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.endswith('torch_runner')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
