"""Continual build: the field teaches the next model (``edge-tl build --from RUN --add DIR``, issue 25 item 6).

The parent is a finished build's run folder (its bundle is what the devices run). The child:

1. starts from the parent's fine-tuned weights (the unpruned model the shipped one was pruned from; with the
   negative-transfer guard's choice, the from-scratch one) and keeps the parent's spec, classes and recipe;
2. trains on the parent's training images (``continual.rehearsal = "replay"``, against forgetting) plus the
   field's labelled pictures less a held-out part (``continual.field_holdout``, stratified and seeded), validates
   on the parent's validation split and is tested on the parent's test split: the data stage reads
   ``<run>/continual/data/{train,val,test}/`` (links to the files, made once);
3. is pruned, quantized and gated as usual; then, before a bundle is written, its shipped INT8 model and the
   parent's (both Q/DQ in float, the build's evaluation everywhere) answer the parent's test split (forgetting)
   and the held-out field pictures (adaptation), paired on the same images (McNemar, paired bootstrap).

It ships only when the field gain is real (``continual.gain_score``: the paired interval of top-1 above 0, or,
with ``"views"``, the default, the paired interval of top-1 on ``data.val_views`` augmented copies of each
held-out picture above 0 and top-1 not lower; ``"log-loss"`` the same with the log-loss) and the forgetting on
the parent's test split is within ``continual.max_forgetting_points``; otherwise the build stops with the
numbers and writes no bundle. The manifest records the parent bundle and every field picture's sha256 and split.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.core.bundle import INT8_MODEL, Bundle
from edge_tl.core.errors import EdgeTLError
from edge_tl.core.fsutil import atomic_write_text, sha256_file
from edge_tl.workstation.data import DataSplit, _scan_class_folders
from edge_tl.workstation.spec import BuildSpec, load_spec

#: fewest held-out field pictures a gain is judged on: below it no paired test can tell a gain from luck
MIN_HOLDOUT = 10
FOLDER = "continual"  # <run>/continual/: data/ (what the data stage reads), holdout/, field.json


@dataclass
class Parent:
    run: Path
    bundle: Bundle
    spec: BuildSpec
    split: DataSplit
    start: Path  # the weights the child starts from
    start_stage: str


@dataclass
class Plan:
    parent: Parent
    field_root: Path
    classes: list[str]
    train: list[tuple[Path, int, str]]  # (file, class index, sha256)
    holdout: list[tuple[Path, int, str]]
    skipped: list[dict[str, str]]
    rehearsal: str

    def record(self) -> dict[str, Any]:
        """What the manifest says about the lineage: the parent bundle and the field data's hashes."""
        m = self.parent.bundle.manifest
        return {"parent": {"bundle_id": m.bundle_id, "name": m.name, "created": m.created,
                           "run": str(self.parent.run), "start": self.parent.start_stage},
                "rehearsal": self.rehearsal,
                "field": {"root": str(self.field_root),
                          "files": [{"file": p.relative_to(self.field_root).as_posix(), "sha256": h,
                                     "label": self.classes[c], "use": use}
                                    for use, part in (("train", self.train), ("holdout", self.holdout))
                                    for p, c, h in part],
                          "skipped": self.skipped}}


def parent_run(path: str | Path) -> Path:
    """The run folder of ``path``: a run folder, or the bundle/ (or bundle.tar.gz) a build wrote inside one."""
    p = Path(path).expanduser()
    for cand in (p, p.parent):
        if (cand / "run.json").is_file() and (cand / "spec.resolved.toml").is_file():
            return cand.resolve()
    if p.exists():
        raise EdgeTLError(f"--from {path} is neither a build's run folder nor the bundle inside one",
                          "a continual build needs the parent's run folder (its fine-tuned weights and data split); "
                          "pass the --out folder of the build that made the deployed bundle")
    raise EdgeTLError(f"--from {path} does not exist", "pass the run folder of the build that made the bundle")


def load_parent(path: str | Path) -> Parent:
    run = parent_run(path)
    state = json.loads((run / "run.json").read_text())
    if state.get("status") != "done" or not state.get("bundle_id"):
        raise EdgeTLError(f"the parent build in {run} is not finished (status: {state.get('status')})",
                          "finish it first (run the same edge-tl build command again)")
    bundle = Bundle.open(run / "bundle")  # verified: hashes, and the signature when the bundle is signed
    if bundle.manifest.bundle_id != state["bundle_id"]:
        raise EdgeTLError(f"{run / 'bundle'} is not the bundle its build wrote ({bundle.manifest.bundle_id} vs "
                          f"{state['bundle_id']} in run.json)", "rebuild the parent, or pass its own run folder")
    spec = load_spec(run / "spec.resolved.toml")
    keys = state["stage_keys"]
    split = DataSplit.from_json((run / "stages" / f"data-{keys['data']}" / "split.json").read_text())
    pruned_from = (bundle.manifest.build.get("transfer") or {}).get("continued_from", "finetune")
    stage = "scratch" if pruned_from == "scratch" else "finetune"
    start = run / "stages" / f"{stage}-{keys[stage]}" / "model.pt"
    if not start.is_file():
        raise EdgeTLError(f"the parent's {stage} model {start} is missing", "rebuild the parent (edge-tl build)")
    return Parent(run, bundle, spec, split, start, stage)


def plan(spec: BuildSpec) -> Plan:
    """Check the parent and the field pictures (nothing written); the field split into train and held-out."""
    c = spec.continual
    if not c.add:
        raise EdgeTLError("--from needs --add: the labelled field pictures to train on",
                          "pass --add DIR (one folder per class, e.g. what edge-tl label wrote)")
    parent = load_parent(c.parent)
    classes = parent.bundle.manifest.classes
    root = Path(c.add).expanduser().resolve()
    if not root.is_dir():
        raise EdgeTLError(f"--add {c.add} is not a folder", "pass a folder with one sub-folder of pictures per class")
    if root == parent.run or parent.run in root.parents:
        raise EdgeTLError(f"--add {c.add} is inside the parent's run folder", "pass the labelled pictures' folder")
    skipped: list[dict[str, str]] = []
    per_class = _scan_class_folders(root, root, skipped)  # class -> decodable pictures (relative), as the data stage
    unknown = [name for name in per_class if name not in classes]
    if unknown:
        raise EdgeTLError(f"--add {c.add}: class folder {unknown[0]!r} is not a class of the parent "
                          f"({', '.join(classes)})", "a continual build keeps the parent's classes: move those "
                          "pictures into a class folder of the parent, or add a class with a new build "
                          "(edge-tl build --data ...)")
    rng = np.random.default_rng(spec.seed)
    train, holdout = [], []
    for name, rels in per_class.items():
        if not rels:
            continue
        if len(rels) < 2:
            raise EdgeTLError(f"--add {c.add}: class {name!r} has 1 field picture; part of each class is held out "
                              "to measure the gain", "add at least one more picture of it, or remove the folder")
        files = [root / rel for rel in rels]
        order = rng.permutation(len(files))
        n_hold = min(len(files) - 1, max(1, round(len(files) * c.field_holdout)))
        for rank, i in enumerate(order):
            (holdout if rank < n_hold else train).append((files[i], classes.index(name), sha256_file(files[i])))
    if not train and not holdout:
        raise EdgeTLError(f"--add {c.add} holds no readable pictures in class folders",
                          f"add pictures in sub-folders named like the parent's classes ({', '.join(classes)})")
    if len(holdout) < MIN_HOLDOUT:
        need = int(np.ceil(MIN_HOLDOUT / c.field_holdout))
        raise EdgeTLError(f"--add {c.add}: {len(train) + len(holdout)} field pictures leave {len(holdout)} held out "
                          f"(continual.field_holdout = {c.field_holdout:g}), fewer than the {MIN_HOLDOUT} a gain is "
                          "judged on", f"label about {need} or more field pictures (or raise continual.field_holdout)")
    if c.rehearsal == "none":
        missing = sorted(set(classes) - {classes[lbl] for _, lbl, _ in train})
        if missing:
            raise EdgeTLError(f"continual.rehearsal = 'none' trains on the field pictures alone, and they have no "
                              f"{missing[0]!r}", "add field pictures of every class, or keep rehearsal = 'replay'")
    return Plan(parent, root, classes, train, holdout, skipped, c.rehearsal)


def child_spec(spec: BuildSpec, p: Plan, run_dir: Path) -> BuildSpec:
    """The parent's recipe on the merged data, starting from the parent's weights. The negative-transfer guard
    and the from-scratch comparison are off: the start is the parent itself, judged against it afterwards."""
    d = spec.model_dump(mode="json")
    d["data"]["root"] = str((Path(run_dir) / FOLDER / "data").resolve())
    d["model"]["weights"] = str(p.parent.start)
    d["report"]["compare_scratch"] = False
    d["train"]["continue_with"] = "finetuned"
    d["continual"]["parent"] = str(p.parent.run)
    d["continual"]["add"] = str(p.field_root)
    return BuildSpec.model_validate(d)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same file system: no copy, and the same mtime (the data stage's key stays)
    except OSError:
        shutil.copy2(src, dst)


def materialize(p: Plan, run_dir: Path) -> Path:
    """Write ``<run>/continual/`` once (again when the parent, the field or the split changed): data/ with the
    three splits, holdout/ with the held-out field pictures, field.json with what went where."""
    base = Path(run_dir) / FOLDER
    about = {"parent": p.parent.bundle.manifest.bundle_id, "rehearsal": p.rehearsal, **p.record()["field"]}
    meta = base / "field.json"
    if meta.is_file() and json.loads(meta.read_text()) == about:
        return base / "data"
    if base.exists():
        shutil.rmtree(base)  # ours: <run>/continual of an edge-tl run folder (claimed by RunFolder)
    tmp = base.with_name(f".{FOLDER}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    classes = p.classes
    for part in ("train", "val", "test"):
        for rel, label in p.parent.split.items[part]:
            if part == "train" and p.rehearsal == "none":
                continue
            src = Path(p.parent.split.root) / rel
            _link(src, tmp / "data" / part / classes[label] / f"parent-{_flat(rel)}")
    for src, label, h in p.train:
        _link(src, tmp / "data" / "train" / classes[label] / f"field-{h[:16]}{src.suffix.lower()}")
    for src, label, h in p.holdout:
        _link(src, tmp / "holdout" / classes[label] / f"field-{h[:16]}{src.suffix.lower()}")
    atomic_write_text(tmp / "field.json", json.dumps(about, indent=1) + "\n")
    os.replace(tmp, base)
    return base / "data"


def _flat(rel: str) -> str:
    return rel.replace("/", "__")


def _evaluate(child_model: Path, child_t: float, x: np.ndarray, child_pre, parent: Parent, paths: list[Path],
              y: np.ndarray, seed: int, views: int = 0, hflip: bool = False) -> dict[str, Any]:
    """Child against parent on the pictures ``paths`` (labels ``y``): top-1, log-loss (each model's calibrated
    temperature: ``child_t`` is what the child's bundle will carry, the parent's is in its bundle) and, with
    ``views``, the share of each picture's ``views`` lightly augmented copies (the decision set's draw) each gets
    right. ``x``: the pictures through the child's preprocessing (the parent's, unless the spec changed it); with
    ``views``, followed by the copies."""
    from edge_tl.workstation.calibrate import per_image_nll
    from edge_tl.workstation.pipeline.stages import onnx_logits
    from edge_tl.workstation.stats import paired, paired_mean, wilson
    from edge_tl.workstation.train.datasets import decision_views

    n = int(y.size)
    parent_pre = parent.bundle.preprocess
    xp = x if parent_pre == child_pre else decision_views(paths, y, parent_pre, views, hflip=hflip, seed=seed)[0]
    lc = onnx_logits(child_model, x)  # Q/DQ in float: the same numbers on every CPU
    lp = onnx_logits(parent.bundle.file(INT8_MODEL), xp)
    yy = np.tile(y, len(lc) // n)
    share_c = (lc.argmax(1) == yy).reshape(-1, n).mean(axis=0)  # row 0: the pictures, then one row per view
    share_p = (lp.argmax(1) == yy).reshape(-1, n).mean(axis=0)
    lc, lp = lc[:n], lp[:n]
    child, par = lc.argmax(1) == y, lp.argmax(1) == y
    pr = paired(child, par, seed=seed)
    # log-loss gain = parent's - child's: positive when the child gives the true class more of its score
    ll = paired_mean(per_image_nll(lp, y, parent.bundle.postprocess.temperature), per_image_nll(lc, y, child_t),
                     seed=seed)
    out = {"images": n, "child_top1": float(child.mean()), "child_ci": wilson(int(child.sum()), n),
           "parent_top1": float(par.mean()), "parent_ci": wilson(int(par.sum()), n),
           "diff_points": pr.diff_points, "diff_ci_points": list(pr.ci_points), "mcnemar_p": pr.mcnemar_p,
           "child_only": pr.a_only, "parent_only": pr.b_only,
           "log_loss_gain": ll.diff, "log_loss_gain_ci": list(ll.ci), "wilcoxon_p": ll.wilcoxon_p}
    if views:
        vw = paired_mean(100.0 * share_c, 100.0 * share_p, seed=seed)
        out |= {"views": views, "views_diff_points": vw.diff, "views_diff_ci_points": list(vw.ci)}
    return out


def field_gain(adapt: dict[str, Any], score: str) -> tuple[bool, str]:
    """Whether the held-out field pictures prove a gain (``continual.gain_score``), and the evidence in words:
    the top-1 gain's interval above 0, or, with ``log-loss`` / ``views``, that score's interval above 0 and the
    top-1 gain not below 0."""
    lo, hi = adapt["diff_ci_points"]
    top1 = f"top-1 {adapt['diff_points']:+.1f} points [95% CI {lo:+.1f}, {hi:+.1f}]"
    if score == "log-loss":
        slo, shi = adapt["log_loss_gain_ci"]
        other = f"log-loss gain {adapt['log_loss_gain']:+.3f} nats [95% CI {slo:+.3f}, {shi:+.3f}]"
    elif score == "views" and "views_diff_ci_points" in adapt:  # data.val_views = 0: no copies, top-1 alone
        slo, shi = adapt["views_diff_ci_points"]
        other = (f"top-1 on {adapt['views']} augmented copies of each {adapt['views_diff_points']:+.1f} points "
                 f"[95% CI {slo:+.1f}, {shi:+.1f}]")
    else:
        slo, other = 0.0, ""
    if lo > 0:
        return True, top1
    if other and slo > 0 and adapt["diff_points"] >= 0:
        return True, f"{other} with {top1}"
    return False, f"{top1}, {other}" if other else top1


def judge(ctx: Any, p: Plan) -> dict[str, Any]:
    """The child's shipped INT8 model against the parent's, on the parent's test split and on the held-out field
    pictures; the verdict. Written to ``<run>/continual.json`` either way; a child that did not earn its rollout
    stops the build here (no bundle) with the numbers."""
    from edge_tl.core.errors import CheckFailed

    s = ctx.spec
    split = ctx.data_split
    if split.classes != p.classes:
        raise EdgeTLError(f"the continual data's classes {split.classes} are not the parent's {p.classes}",
                          "keep the parent's class folders (a continual build cannot add or rename classes)")
    child_model = ctx.folder("qat") / "model.int8.onnx"
    ctx.console.print("[bold]→[/] continual: the child's INT8 model against the parent's (paired, same images)")
    x_test, y_test = ctx.arrays("test")  # already preprocessed for the stages' own test numbers
    from edge_tl.workstation.pipeline.bundling import postprocess_config
    from edge_tl.workstation.train.datasets import decision_views

    child_t = postprocess_config(ctx.read("qat", "metrics.json")).temperature  # what the child's bundle will carry
    forget = _evaluate(child_model, child_t, x_test, ctx.pre, p.parent, split.paths("test"), y_test, s.seed)
    held = [f for f, _, _ in p.holdout]
    y_held = np.asarray([lbl for _, lbl, _ in p.holdout], dtype=np.int64)
    views, hflip = s.data.val_views, ctx.augmentation()["hflip"]
    x_held = decision_views(held, y_held, ctx.pre, views, hflip=hflip, seed=s.seed)[0]
    adapt = _evaluate(child_model, child_t, x_held, ctx.pre, p.parent, held, y_held, s.seed, views, hflip)
    forgetting = -forget["diff_points"]
    limit = s.continual.max_forgetting_points
    gain_real, evidence = field_gain(adapt, s.continual.gain_score)
    forgetting_ok = forgetting <= limit
    why = []
    if not gain_real:
        why.append(f"the field gain ({evidence}) on {adapt['images']} held-out field pictures is not above 0"
                   f" (continual.gain_score = {s.continual.gain_score})")
    if not forgetting_ok:
        lo, hi = forget["diff_ci_points"]
        why.append(f"it forgets {forgetting:.1f} points on the parent's {forget['images']} test images "
                   f"(child - parent {forget['diff_points']:+.1f} [95% CI {lo:+.1f}, {hi:+.1f}]; "
                   f"continual.max_forgetting_points = {limit:g})")
    result = {**p.record(), "field_train": len(p.train), "field_holdout": len(p.holdout),
              "forgetting": {**forget, "points": forgetting, "limit_points": limit, "passed": forgetting_ok},
              "adaptation": {**adapt, "passed": gain_real, "gain_score": s.continual.gain_score,
                             "evidence": evidence}, "ships": not why, "why_not": why}
    atomic_write_text(ctx.run_dir / "continual.json", json.dumps(result, indent=2, default=float) + "\n")
    ctx.console.print(f"  field (held out, {adapt['images']}): child {adapt['child_top1']:.1%} vs parent "
                      f"{adapt['parent_top1']:.1%}; parent's test ({forget['images']}): child "
                      f"{forget['child_top1']:.1%} vs parent {forget['parent_top1']:.1%}")
    if why:
        raise CheckFailed(f"the continual build did not earn a rollout: {'; '.join(why)}; no bundle written",
                          f"the numbers are in {ctx.run_dir / 'continual.json'}; label more field pictures "
                          "(or keep the parent deployed)")
    return result


def report_lines(result: dict[str, Any]) -> list[str]:
    """The report's section on the lineage and the two paired comparisons."""
    par, f, a = result["parent"], result["forgetting"], result["adaptation"]

    def row(what: str, r: dict[str, Any]) -> str:
        (lo, hi), (llo, lhi) = r["diff_ci_points"], r["log_loss_gain_ci"]
        return (f"| {what} | {r['images']} | {100 * r['parent_top1']:.1f}% | {100 * r['child_top1']:.1f}% | "
                f"{r['diff_points']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {r['mcnemar_p']:.3g} | "
                f"{r['log_loss_gain']:+.3f} [{llo:+.3f}, {lhi:+.3f}] |")

    return ["", "## Continual build (the field's pictures)", "",
            f"Parent: bundle {par['name']} `{par['bundle_id']}` (run {par['run']}), started from its "
            f"{par['start']} weights; rehearsal: {result['rehearsal']}; {result['field_train']} field pictures "
            f"trained, {result['field_holdout']} held out. Both models' shipped INT8 files (Q/DQ in float) on the "
            "same images; difference = child - parent, paired bootstrap 95% CI, exact McNemar p; log-loss gain = "
            "parent's - child's mean negative log-likelihood of the true class, each with its calibrated "
            "temperature (nats, paired bootstrap 95% CI).", "",
            "| images | n | parent | child | child - parent, points | McNemar p | log-loss gain |",
            "|---|---|---|---|---|---|---|",
            row("held-out field pictures (adaptation)", a), row("parent's test split (forgetting)", f), "",
            f"Shipped: the field gain is real ({a['evidence']}; continual.gain_score = {a['gain_score']}), and "
            + (f"the child forgets {f['points']:.1f} points of the parent's test top-1, within "
               if f["points"] > 0 else "the child loses nothing on the parent's test split (limit: ")
            + f"continual.max_forgetting_points = {f['limit_points']:g}" + ("." if f["points"] > 0 else ").")]
