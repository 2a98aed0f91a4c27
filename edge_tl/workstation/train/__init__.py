"""The training side: torchvision backbones with a new head, weights, data for the loop, and the loop itself."""

from __future__ import annotations

from edge_tl.workstation.train.backbones import (
    build,
    create_model,
    head_name,
    load_state,
    reshape_to,
    save_state,
)
from edge_tl.workstation.train.fit import (
    FitResult,
    Phase,
    evaluate,
    finetune_phases,
    fit,
    pick_device,
    recalibrate_bn,
    recovery_phases,
    scratch_phases,
)

__all__ = [
    "FitResult", "Phase", "build", "create_model", "evaluate", "finetune_phases", "fit", "head_name", "load_state",
    "pick_device", "recalibrate_bn", "recovery_phases", "reshape_to", "save_state", "scratch_phases",
]
