"""Between training and pruning: the negative-transfer guard and ``train.continue_with``.

After the ``finetune`` and ``scratch`` stages (cached or not), :func:`decide` pairs their validation predictions
(edge_tl.workstation.train.transfer.transfer_verdict), prints the verdict (a loud warning when the pretrained start
is not better than scratch beyond noise), picks the model that goes on to pruning, and re-keys the stages after
it when that is the from-scratch one. The record goes to ``ctx.transfer``: the manifest (``build.transfer``),
metrics.json and the report.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.markup import escape

from edge_tl.core.errors import EdgeTLError
from edge_tl.workstation.pipeline.context import Context

VAL_PREDICTIONS = "val_predictions.npy"


def needs_scratch(ctx: Context) -> bool:
    """Whether the scratch stage runs: the report asked for it, or continue_with = 'scratch' needs its model."""
    return ctx.spec.report.compare_scratch or ctx.spec.train.continue_with == "scratch"


def _val_correct(ctx: Context, stage: str) -> np.ndarray:
    pred = np.load(ctx.folder(stage) / VAL_PREDICTIONS)
    return pred == ctx.arrays("val")[1]


def decide(ctx: Context, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run the guard, choose the pruned model (sets ``ctx.parent``/``ctx.transfer``, re-keys), say it."""
    from edge_tl.workstation.train.transfer import choose, guard_record, guard_warning, transfer_verdict

    cw = ctx.spec.train.continue_with
    if ctx.weights == "none":  # the fine-tune stage itself trained from scratch: nothing to compare
        if cw == "scratch":
            raise EdgeTLError("train.continue_with = 'scratch' with weights = none: both models train from scratch",
                              "use continue_with = 'finetuned' or 'auto' with --weights none")
        ctx.transfer = guard_record(None, "finetune", "weights = none: no pretrained start to guard", None)
        return ctx.transfer
    guard = None
    if "scratch" in stages:
        guard = transfer_verdict(_val_correct(ctx, "finetune"), _val_correct(ctx, "scratch"))
    parent, why = choose(cw, guard)
    warning = guard_warning(guard, ctx.weights_label, parent, why) if guard else None
    if guard is not None and not guard["fired"]:
        g = guard
        ctx.console.print(f"[green]✓[/] transfer  the pretrained start beats scratch on validation: "
                          f"{100 * g['pretrained_val_top1']:.1f}% vs {100 * g['scratch_val_top1']:.1f}% "
                          f"(one-sided McNemar p = {g['p_pretrained_better']:.2g})")
    if warning:
        ctx.console.print(f"[bold red]WARNING:[/] {escape(warning)}")
    elif parent == "scratch":  # asked for explicitly: still said, never silent
        ctx.console.print(f"[yellow]note:[/] pruning and shipping the from-scratch model ({escape(why)})")
    ctx.parent = parent
    ctx.transfer = guard_record(guard, parent, why, warning)
    if parent != "finetune":
        ctx.compute_keys()
    return ctx.transfer


def report_lines(ctx: Context) -> list[str]:
    """The report's "Negative-transfer guard" section."""
    t = ctx.transfer
    if not t:
        return []
    lines = ["## Negative-transfer guard", ""]
    g = t.get("negative_transfer")
    if g:
        lo, hi = g["ci95_points"]
        verdict = {"helps": "the pretrained start is better than scratch",
                   "no_gain": "the pretrained start is NOT better than scratch beyond noise",
                   "negative": "the pretrained start is WORSE than scratch (negative transfer)"}[g["verdict"]]
        lines += [f"Verdict: **{verdict}**. Validation top-1: pretrained {100 * g['pretrained_val_top1']:.1f}%, "
                  f"scratch {100 * g['scratch_val_top1']:.1f}% on the same {g['val_images']} images "
                  f"({g['diff_points']:+.1f} points, paired bootstrap 95% CI {lo:+.1f} to {hi:+.1f}; "
                  f"{g['pretrained_only']} images only the pretrained one gets right, {g['scratch_only']} only "
                  f"scratch; one-sided McNemar p = {g['p_pretrained_better']:.3g} that pretrained is better, "
                  f"{g['p_scratch_better']:.3g} that scratch is). Method: {g['method']}.", ""]
    if t.get("warning"):
        lines += [f"**WARNING:** {t['warning']}", ""]
    model = "from-scratch" if t["continued_from"] == "scratch" else "fine-tuned"
    lines += [f"Pruned and shipped: the **{model}** model ({t['continued_because']}).", ""]
    return lines
