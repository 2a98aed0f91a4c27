"""The build spec: TOML + pydantic, one-line errors naming the key, CLI overrides, the demo recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_tl.core.errors import EdgeTLError
from edge_tl.workstation.spec import DEMO_SETTINGS, BuildSpec, load_spec, read_toml, to_toml

RECIPES = Path(__file__).resolve().parents[1] / "models" / "recipes"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return p


def test_defaults_are_documented_values():
    s = BuildSpec()
    assert s.model.backbone == "mobilenet_v2" and s.model.weights == "imagenet"
    assert s.train.lr_backbone < s.train.lr_head
    assert s.prune.ratio == 0.5 and s.prune.round_to == 8
    assert s.model.preprocess().resize == 256 and s.model.preprocess().input_size == (224, 224)
    assert s.opset() == 17


def test_demo_recipe_file_equals_builtin_demo():
    from_file = load_spec(RECIPES / "demo.toml")
    assert from_file == BuildSpec.demo()
    assert from_file.is_demo and from_file.model.weights == "demo"
    assert load_spec(None) == BuildSpec.demo()


def test_imagenet_recipe_is_valid_and_resolves_paths_relative_to_the_file():
    s = load_spec(RECIPES / "imagefolder_imagenet.toml")
    assert s.model.backbone == "mobilenet_v3_large"
    assert Path(s.data.root).is_absolute()
    assert Path(s.data.root) == (RECIPES / "../../data/flowers").resolve()


def test_photo_recipe_is_valid_and_says_what_the_photo_benchmark_ran():
    """models/recipes/photos_lite0.toml (the README's recipe for one's own photos, benchmarks/bench_photos.py's):
    a typo in it would stop every user's first build."""
    s = load_spec(RECIPES / "photos_lite0.toml")
    assert (s.model.backbone, s.model.weights, s.model.input_size, s.model.resize) == ("efficientnet_lite0",
                                                                                       "imagenet", 224, 256)
    assert s.model.preprocess().mean == (0.5, 0.5, 0.5) and s.data.kind == "photos"
    assert s.train.mode == "feature-extract" and s.train.head_views == 4
    assert (s.prune.ratio, s.prune.channels, s.prune.importance, s.prune.recovery_distill) == (
        0.4, "hidden", "contribution", "blocks")
    assert (s.prune.recovery_epochs, s.prune.recovery_mixup) == (20, 1.0)  # function matching (RESULTS "photos")
    assert Path(s.data.root) == (RECIPES / "../../data/photos").resolve()


def test_unknown_key_names_the_key_and_file(tmp_path):
    with pytest.raises(EdgeTLError) as exc:
        load_spec(write(tmp_path, "[train]\nepochz = 3\n"))
    msg = str(exc.value)
    assert msg.startswith("spec.toml: train.epochz: Extra inputs are not permitted")
    assert "\n" not in msg


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(EdgeTLError, match=r"^spec.toml: train.lr_head: Input should be greater than 0"):
        load_spec(write(tmp_path, "[train]\nlr_head = -1\n"))
    with pytest.raises(EdgeTLError, match=r"model.backbone: unknown backbone 'resnet9'"):
        load_spec(write(tmp_path, "[model]\nbackbone = 'resnet9'\n"))


def test_override_beats_file_and_error_names_the_flag(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 3\n[data]\nroot = 'imgs'\n")
    s = load_spec(path, {"train.epochs": 7, "model.backbone": "squeezenet1_1"})
    assert s.train.epochs == 7 and s.model.backbone == "squeezenet1_1"
    assert s.data.root == str(tmp_path / "imgs")
    with pytest.raises(EdgeTLError, match=r"^--epochs: train.epochs: Input should be greater than or equal to 1"):
        load_spec(path, {"train.epochs": 0}, {"train.epochs": "--epochs"})


def test_data_flag_without_spec_uses_defaults_not_demo(tmp_path):
    s = load_spec(None, {"data.root": str(tmp_path)})
    assert not s.is_demo and s.model.weights == "imagenet" and s.data.root == str(tmp_path.resolve())


def test_opset_above_target_limit_is_refused(tmp_path):
    with pytest.raises(EdgeTLError, match="exceeds jetpack5's TensorRT 8.5.2 limit of 17"):
        load_spec(write(tmp_path, "target = 'jetpack5'\n[export]\nopset = 18\n"))
    assert load_spec(write(tmp_path, "target = 'jetpack6'\n[export]\nopset = 18\n")).opset() == 18
    with pytest.raises(EdgeTLError, match="target: unknown target 'jetpack9'"):
        load_spec(write(tmp_path, "target = 'jetpack9'\n"))


def test_finetune_backbone_lr_must_not_exceed_head_lr(tmp_path):
    with pytest.raises(EdgeTLError, match="lr_backbone .* must not exceed lr_head"):
        load_spec(write(tmp_path, "[train]\nlr_head = 0.001\nlr_backbone = 0.01\n"))
    ok = load_spec(write(tmp_path, "[train]\nmode = 'feature-extract'\nlr_head = 0.001\nlr_backbone = 0.01\n"))
    assert ok.train.mode == "feature-extract"


def test_invalid_toml_and_missing_file_are_one_line(tmp_path):
    with pytest.raises(EdgeTLError, match="not valid TOML"):
        read_toml(write(tmp_path, "[train\n"))
    with pytest.raises(EdgeTLError, match="does not exist"):
        load_spec(tmp_path / "nope.toml")


def test_resolved_toml_round_trips(tmp_path):
    spec = load_spec(None, {"train.epochs": 5, "quantize.method": "entropy"})
    again = load_spec(write(tmp_path, to_toml(spec)))
    assert again == spec


def test_digest_tracks_settings():
    a, b = BuildSpec.demo(), load_spec(None, {"train.epochs": 61})
    assert a.digest("train") != b.digest("train")
    assert a.digest("prune") == b.digest("prune")
    assert DEMO_SETTINGS["model"]["input_size"] == 32


def test_the_stage_list_is_written_once():
    """spec.STAGES is the list; the pipeline's per-stage tables (runners, cache versions, dependencies) cover
    exactly it, in its order, and every dependency comes earlier."""
    from edge_tl.workstation.pipeline.cache import DEPENDS, STAGE_VERSIONS
    from edge_tl.workstation.pipeline.run import RUNNERS
    from edge_tl.workstation.spec import STAGES

    assert tuple(RUNNERS) == tuple(STAGE_VERSIONS) == tuple(DEPENDS) == STAGES
    for stage, deps in DEPENDS.items():
        assert all(STAGES.index(d) < STAGES.index(stage) for d in deps)


def test_val_views_re_keys_the_deciding_stages_only(tmp_path):
    """data.val_views changes what the prune and qat stages choose, nothing the data or training stages make:
    a new value must re-run those two (and what follows them), and reuse the data split and the fine-tune."""
    from rich.console import Console

    from edge_tl.workstation.pipeline.cache import StageCache
    from edge_tl.workstation.pipeline.context import Context, resolve_data
    from edge_tl.workstation.spec import load_spec

    keys = {}
    for views in (20, 0):
        spec = load_spec(None, {"data.val_views": views})
        root, label = resolve_data(spec, tmp_path)
        ctx = Context(spec, tmp_path, StageCache(tmp_path), Console(quiet=True), root, label, "demo", "demo")
        keys[views] = ctx.compute_keys()
    same = {k for k in keys[20] if keys[20][k] == keys[0][k]}
    assert same == {"data", "finetune", "scratch"}
    assert {"prune", "export", "quantize", "qat"} == set(keys[20]) - same


def test_recovery_batchnorm_follows_the_input_size_unless_set():
    """prune.recovery_bn = auto: frozen at the demo's 32 px (as train.freeze_bn), trained at 224 px, where a
    frozen-BN recovery collapsed to chance (issue 23); an explicit value is what runs."""
    from edge_tl.workstation.pipeline.stages import recovery_bn_frozen
    from edge_tl.workstation.spec import BuildSpec

    demo = BuildSpec.demo()
    assert demo.model.input_size == 32 and recovery_bn_frozen(demo)
    big = BuildSpec.model_validate({"model": {"input_size": 224}})
    assert not recovery_bn_frozen(big)
    spec = BuildSpec.model_validate
    assert not recovery_bn_frozen(spec({"train": {"freeze_bn": False}, "model": {"input_size": 32}}))
    assert recovery_bn_frozen(spec({"model": {"input_size": 224}, "prune": {"recovery_bn": "frozen"}}))
    assert not recovery_bn_frozen(spec({"model": {"input_size": 32}, "prune": {"recovery_bn": "train"}}))


@pytest.mark.parametrize(("toml", "needle"), [
    ("[model]\nstd = [0.5, 0.0, 0.5]\n", "model.std: each std must be a finite number > 0"),
    ("[model]\nmean = [0.5, nan, 0.5]\n", "model.mean.1: Input should be a finite number"),
    ("seed = 9223372036854775808\n", "seed: Input should be less than or equal to 4294967295"),
    ("[train]\nbatch_size = 1\n", "train.batch_size: Input should be greater than or equal to 2"),
    ("[prune]\nrecovery_distill = \"blocks\"\n", "only prune.channels = 'hidden' leaves the same width"),
])
def test_values_that_validated_then_crashed_are_refused_up_front(tmp_path, toml, needle):
    """Issue 24: std 0 divided by zero, a seed above 2^63 overflowed in torch, a batch of 1 failed in BatchNorm;
    block-wise distillation of a net whose blocks lost width would fail at the recovery's first step."""
    with pytest.raises(EdgeTLError, match=needle):
        load_spec(write(tmp_path, toml))
