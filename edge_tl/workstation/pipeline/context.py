"""What every stage needs: the spec, the run folder, the data (scanned once, preprocessed once), the stage keys."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from edge_tl.core.errors import EdgeTLError, InternalError
from edge_tl.core.preprocess import PreprocessConfig
from edge_tl.workstation.data import DataSplit, scan
from edge_tl.workstation.pipeline.cache import StageCache, file_digest, stage_key
from edge_tl.workstation.spec import BuildSpec


def quick_fingerprint(root: Path) -> str:
    """Paths, sizes and mtimes of every file under ``root`` (no decoding): what the data stage's key hashes."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_data(spec: BuildSpec, run_dir: Path) -> tuple[Path, str]:
    """(ImageFolder root, how to describe it). The demo's digits are written under ``<run>/demo-data/``."""
    if spec.is_demo:
        from edge_tl.workstation import demo

        shots = demo.parse_shots(spec.data.demo_shots)
        root = demo.target_task(run_dir / "demo-data", shots=shots, seed=spec.seed)
        return root, f"edge-tl demo: sklearn digits 5-9, {spec.data.demo_shots} training images per class"
    root = Path(spec.data.root).expanduser()
    if not root.is_dir():
        raise EdgeTLError(f"data folder {root} does not exist" if not root.exists() else f"{root} is not a folder",
                          "pass --data with an ImageFolder root (one sub-folder per class)")
    out = run_dir.resolve()
    if out == root.resolve() or root.resolve() in out.parents:  # its stages/ and bundle/ would become classes
        raise EdgeTLError(f"--out {run_dir} is inside the data folder {root}",
                          "choose an --out outside --data (the run's files would be read as images next time)")
    return root.resolve(), str(root.resolve())


def resolve_weights(spec: BuildSpec) -> tuple[str, str]:
    """(what create_model takes, what the manifest and the cache key record)."""
    w = spec.model.weights
    if w in ("imagenet", "none"):
        return w, w
    if w == "demo":
        from edge_tl.workstation.demo import demo_checkpoint

        path = demo_checkpoint()
        return str(path), f"demo:models/{path.name}@sha256:{file_digest(path)[:16]}"
    path = Path(w)
    if not path.is_file():
        raise EdgeTLError(f"weights file {path} does not exist", "pass --weights imagenet, none, or an existing file")
    return str(path), f"{path.name}@sha256:{file_digest(path)[:16]}"


#: the quantize section's keys the PTQ stage uses (the rest are the qat stage's)
PTQ_SETTINGS = ("calib_count", "method", "per_channel")


@dataclass
class Context:
    spec: BuildSpec
    run_dir: Path
    cache: StageCache
    console: Console
    data_root: Path
    data_label: str
    weights: str
    weights_label: str
    keys: dict[str, str] = field(default_factory=dict)
    split: DataSplit | None = None
    _arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    _train_ds: Any = None
    ranking: dict[str, Any] | None = None  # backbone = "auto": the ranking that picked it (edge_tl.workstation.rank)
    processes: int = 1  # training processes (edge-tl build --nproc: torchrun, edge_tl.workstation.train.distributed)
    parent: str = "finetune"  # the stage whose model is pruned: finetune or scratch (pipeline.guard)
    transfer: dict[str, Any] | None = None  # the negative-transfer guard's record (pipeline.guard)
    parity_gate: dict[str, Any] | None = None  # the build's own parity gate on the sealed bundle (bundling.self_gate)
    sign_key: Any = None  # the Ed25519 key that signs the bundle (edge_tl.core.signing), None: unsigned
    signature: dict[str, Any] | None = None  # what signed it: {"key_id": ...} or {"unsigned": why}
    continual: Any = None  # edge-tl build --from RUN --add DIR: the plan (edge_tl.workstation.continual.Plan)
    continual_result: dict[str, Any] | None = None  # its verdict against the parent (continual.judge)

    @property
    def pre(self) -> PreprocessConfig:
        return self.spec.model.preprocess()

    @property
    def size(self) -> tuple[int, int]:
        return self.pre.input_size

    @property
    def data_split(self) -> DataSplit:
        """The scanned data; an internal error when a stage asks before the data stage ran."""
        if self.split is None:
            raise InternalError("a stage used the data before the data stage ran")
        return self.split

    @property
    def classes(self) -> list[str]:
        return self.data_split.classes

    def folder(self, stage: str) -> Path:
        return self.cache.folder(stage, self.keys[stage])

    def read(self, stage: str, name: str) -> Any:
        return json.loads((self.folder(stage) / name).read_text())

    def compute_keys(self) -> dict[str, str]:
        s = self.spec
        d = s.model_dump(mode="json")
        # continue_with picks the pruned model after training (self.parent): it changes no training stage
        train = {k: v for k, v in d["train"].items() if k not in ("device", "workers", "continue_with")}
        if self.processes > 1:  # the data order differs from one process's (same global batch): another result
            train["processes"] = self.processes
        # data.kind only sets the augmentation defaults: the resolved augmentation keys the training stages
        # data.val_views only changes the choices scored on validation: it keys the prune and qat stages
        data = {key: v for key, v in d["data"].items() if key not in ("kind", "val_views")}
        views = {"val_views": s.data.val_views}
        k = {"data": stage_key("data", {"data": {**data, "root": str(self.data_root)}, "seed": s.seed,
                                        "files": quick_fingerprint(self.data_root)}, [])}
        common = {"model": d["model"], "train": train, "seed": s.seed, "augmentation": self.augmentation()}
        # weights = none trains with the from-scratch recipe (stages.run_finetune): its rate is an input then
        recipe = {"recipe": "scratch", "lr": s.report.scratch_lr} if self.weights == "none" else {}
        k["finetune"] = stage_key("finetune", {**common, "weights": self.weights_label, **recipe}, [k["data"]])
        # "eval": what a stage measures; bumped when that changes (2: predictions saved, Q/DQ in float)
        # scratch: the pretrained weights are not an input (one scratch model serves any --weights)
        model = {key: v for key, v in d["model"].items() if key != "weights"}
        k["scratch"] = stage_key("scratch", {**common, "model": model, "weights": "none", "lr": s.report.scratch_lr,
                                             "eval": 2},
                                 [k["data"]])
        start = {"from": "scratch"} if self.parent == "scratch" else {}
        k["prune"] = stage_key("prune", {"prune": d["prune"], "train": train, "seed": s.seed, **start,
                                         "augmentation": self.augmentation(), **views, **_table_key(s)},
                               [k[self.parent]])
        k["export"] = stage_key("export", {"opset": s.opset(), "target": s.target, "eval": 2}, [k["prune"]])
        ptq = {key: d["quantize"][key] for key in PTQ_SETTINGS}  # QAT's settings do not change the PTQ model
        k["quantize"] = stage_key("quantize", {"quantize": ptq, "seed": s.seed, "eval": 2},
                                  [k["export"], k["data"]])
        # qat: QAT (its training settings), mixed precision and the shipped INT8 model's choice (pipeline.qat_stage)
        # qat eval 2: + temperature scaling of the shipped model fitted on validation, ECE on test (calibrate.py)
        k["qat"] = stage_key("qat", {"quantize": d["quantize"], "train": train, "seed": s.seed, "eval": 2, **views},
                             [k["quantize"], k["prune"], k[self.parent]])
        self.keys = k
        return k

    # -- data, loaded lazily and once ------------------------------------------------------------------------
    def scan(self) -> DataSplit:
        d = self.spec.data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return scan(self.data_root, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=self.spec.seed,
                        strict=d.strict, imbalance_ratio=d.imbalance_ratio, source=self.data_label)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(preprocessed images, labels) of a split, through the device's Preprocessor."""
        if split not in self._arrays:
            from edge_tl.workstation.train.datasets import eval_arrays

            data = self.data_split
            self._arrays[split] = eval_arrays(data.paths(split), data.labels(split), self.pre)
        return self._arrays[split]

    def decision_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The validation images and ``data.val_views`` lightly augmented copies of each (seeded): what the
        build's choices between candidates are scored on (edge_tl.workstation.train.datasets.decision_views)."""
        if "decision" not in self._arrays:
            from edge_tl.workstation.train.datasets import decision_views

            data = self.data_split
            self._arrays["decision"] = decision_views(data.paths("val"), data.labels("val"), self.pre,
                                                      self.spec.data.val_views, hflip=self.augmentation()["hflip"],
                                                      seed=self.spec.seed)
        return self._arrays["decision"]

    def augmentation(self) -> dict[str, Any]:
        """train.augment / train.hflip resolved by data.kind (edge_tl.workstation.train.augment.resolve)."""
        from edge_tl.workstation.train.augment import resolve

        t = self.spec.train
        return resolve(t.augment, t.hflip, self.spec.data.kind)

    def train_dataset(self) -> Any:
        if self._train_ds is None:
            from edge_tl.workstation.train.datasets import TrainDataset

            data, aug = self.data_split, self.augmentation()
            self._train_ds = TrainDataset(data.paths("train"), data.labels("train"), self.pre,
                                          augment=aug["policy"], hflip=aug["hflip"])
        return self._train_ds

    def calibration(self) -> np.ndarray:
        """Up to ``quantize.calib_count`` training images (un-augmented, preprocessed), a seeded draw."""
        x, _ = self.arrays("train")
        n = min(self.spec.quantize.calib_count, len(x))
        if n < self.spec.quantize.calib_count:
            self.console.print(f"[yellow]note:[/] calibrating on all {n} training images "
                               f"(quantize.calib_count asks for {self.spec.quantize.calib_count})")
        idx = np.sort(np.random.default_rng(self.spec.seed).permutation(len(x))[:n])
        return x[idx]


def _table_key(spec: BuildSpec) -> dict[str, Any]:
    """A latency table's content is an input of the prune stage (checked here, before any stage runs)."""
    t = spec.prune.latency_target
    if t is None or t.backend != "table":
        return {}
    from edge_tl.core.latency_table import load_table, table_digest

    load_table(t.table)  # a missing or malformed table fails now, one line, nothing run or cached
    return {"table": table_digest(t.table)}
