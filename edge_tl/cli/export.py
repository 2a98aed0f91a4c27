"""`edge-tl export triton BUNDLE --out REPO`: a Triton model repository entry. Thin: the work is in
edge_tl.device.triton."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from edge_tl.cli._common import DeployPrecision

out = Console(highlight=False, soft_wrap=True)

export_app = typer.Typer(no_args_is_help=True, help="Export a bundle for other serving engines (Triton).")


class Kind(str, Enum):
    gpu = "gpu"
    cpu = "cpu"


class Accelerator(str, Enum):
    tensorrt = "tensorrt"
    none = "none"


def _ints(text: str | None) -> list[int]:
    from edge_tl.core.errors import EdgeTLError

    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise EdgeTLError(f"--preferred-batch '{text}' is not a list of batch sizes", "e.g. --preferred-batch 4,8")
    return values


@export_app.command("triton")
def triton_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder or .tar.gz (from edge-tl build)."),
    out_dir: Path = typer.Option(..., "--out", help="The model repository (created when missing)."),
    name: str = typer.Option(None, "--name", help="Model name (default: the bundle's name)."),
    precision: DeployPrecision = typer.Option(None, "--precision", help="int8 (the Q/DQ model), fp16 or fp32 (the "
                                              "FP32 model); default: the bundle's default_precision."),
    engine: Path = typer.Option(None, "--engine", help="A TensorRT engine built on the serving device (edge-tl "
                                "engine build): exported as model.plan (platform tensorrt_plan) instead."),
    max_batch: int = typer.Option(None, "--max-batch", min=1, help="max_batch_size (default: the manifest's "
                                  "max_batch, or the engine's profile max)."),
    instances: int = typer.Option(1, "--instances", min=1, help="Model instances (instance_group count)."),
    kind: Kind = typer.Option(Kind.gpu, "--kind", help="Where the instances run."),
    accelerator: Accelerator = typer.Option(None, "--accelerator", help="ONNX Runtime's TensorRT execution "
                                            "accelerator (default: tensorrt on gpu, none on cpu)."),
    max_queue_delay_us: int = typer.Option(100, "--max-queue-delay-us", min=0, help="Dynamic batching: longest "
                                           "wait to fill a batch (microseconds)."),
    preferred_batch: str = typer.Option(None, "--preferred-batch", help="Dynamic batching: preferred sizes, e.g. 4,8."),
    workspace_mb: int = typer.Option(None, "--workspace-mb", min=1, help="TensorRT accelerator workspace (MiB)."),
    trt_cache: str = typer.Option(None, "--trt-cache", help="Folder on the Triton host for the TensorRT "
                                  "accelerator's engine cache (saves the engine build on every load)."),
    version: int = typer.Option(1, "--version", min=1, help="Model version folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace REPO/<name> if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Write REPO/<name>/config.pbtxt, REPO/<name>/<version>/model.onnx (or model.plan) and labels.txt."""
    from edge_tl.device.triton import TritonOptions, export_triton

    opts = TritonOptions(name=name, precision=precision.value if precision else None, max_batch=max_batch,
                         instances=instances, kind=kind.value, accelerator=accelerator.value if accelerator else None,
                         max_queue_delay_us=max_queue_delay_us, preferred_batch=_ints(preferred_batch),
                         workspace_mb=workspace_mb, trt_cache=trt_cache, engine=engine, version=version)
    result = export_triton(bundle, out_dir, opts, overwrite=overwrite)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    accel = f", TensorRT accelerator {result['precision'].upper()}" if result["accelerator"] == "tensorrt" else ""
    out.print(f"[bold green]exported[/] {result['name']} ({result['precision']}, {result['platform']}{accel}, "
              f"max_batch_size {result['max_batch_size']}) to {result['model_dir']}")
    out.print(f"  config: {result['config']}" + ("" if result["validated"] else
                                                   "  (not checked: tritonclient[grpc] is not installed here)"))
    out.print(f"  model:  {result['model']}")
    out.print(f"  serve:  tritonserver --model-repository {Path(out_dir).resolve()}")


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
