"""``edge-tl infer`` (classify files, videos, cameras, streams) and ``edge-tl serve`` (an Open Inference
Protocol HTTP server). Thin layer over :mod:`edge_tl.device.infer` and :mod:`edge_tl.device.serve`; nothing
heavy is imported until a command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from edge_tl.core.errors import EdgeTLError


class _LazyFile:
    """--out: opened at the first record, so a run that fails before classifying anything leaves no file."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def write(self, text: str) -> None:
        if self.file is None:
            try:
                self.file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
            except OSError as exc:
                raise EdgeTLError(f"cannot write --out {self.path} ({exc.strerror or exc})",
                                  "give a writable file path") from exc
        self.file.write(text)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


CAPTURE = typer.Option(None, "--capture", help="Keep the pictures the model is unsure of in this folder (image + "
                       "JSON sidecar, written atomically), for the next model.")
CAPTURE_BELOW = typer.Option(0.6, "--capture-below", help="--capture: keep a picture whose top-1 score is below this "
                             "(or whose top-1 and top-2 scores are closer than 0.1).")
CAPTURE_RANDOM = typer.Option(0.01, "--capture-random", help="--capture: and this share of the others, at random "
                              "(an unbiased sample).")
CAPTURE_PER_MINUTE = typer.Option(30, "--capture-per-minute", help="--capture: at most this many a minute.")
CAPTURE_MAX_MB = typer.Option(512, "--capture-max-mb", help="--capture: stop capturing (never inferring) when the "
                              "folder holds this many MiB.")


def _capture_policy(folder, below: float, rate: float, per_minute: int, max_mb: int):
    if folder is None:
        return None
    from edge_tl.device.capture import CapturePolicy

    return CapturePolicy(max_score=below, random_rate=rate, max_per_minute=per_minute, max_bytes=max_mb << 20)


def infer_cmd(
    source: str = typer.Argument(..., help="Image, folder (recursive), glob, video file, /dev/videoN or a camera "
                                 "index, rtsp://... / http://... stream, or a GStreamer pipeline ending in appsink."),
    bundle: Path = typer.Option(None, "--bundle", "-b", help="Bundle folder or .tar.gz."),
    root: Path = typer.Option(None, help="Use the model deployed under this root (e.g. /opt/edge-tl)."),
    backend: str = typer.Option("auto", help="auto (TensorRT, then ORT GPU, then CPU)|tensorrt|ort-trt|ort-cuda|"
                                "ort-cpu"),
    precision: str = typer.Option(None, help="fp32|int8 (TensorRT also fp16|best); default: the bundle's."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Labels per record."),
    every: int = typer.Option(1, help="Process every N-th frame (or image)."),
    max_fps: float = typer.Option(None, "--max-fps", help="At most this many pictures per second."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the JSON lines here instead of stdout."),
    max_reconnects: int = typer.Option(10, "--max-reconnects", help="Reconnect attempts in a row for a lost stream."),
    threads: int = typer.Option(None, help="CPU threads for ONNX Runtime."),
    capture: Path = CAPTURE, capture_below: float = CAPTURE_BELOW, capture_random: float = CAPTURE_RANDOM,
    capture_per_minute: int = CAPTURE_PER_MINUTE, capture_max_mb: int = CAPTURE_MAX_MB,
) -> None:
    """Classify pictures: one JSON line per image or frame (top-k labels, scores, latency, model version)."""
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    from edge_tl.device.infer import run_infer
    from edge_tl.device.sources import parse_source

    spec = parse_source(source)
    total = -(-len(spec.files) // every) if spec.kind == "images" and every >= 1 else None
    err = Console(stderr=True)
    if out is not None and out.parent and not out.parent.is_dir():
        raise EdgeTLError(f"folder {out.parent} does not exist", "create it, or write --out elsewhere")
    if out is not None and out.is_dir():
        raise EdgeTLError(f"--out {out} is a folder", "give a file path for the JSON lines, e.g. --out results.jsonl")
    if out is not None and spec.kind == "images" and out.resolve() in {Path(f).resolve() for f in spec.files}:
        raise EdgeTLError(f"--out {out} is one of the images to classify (it would be overwritten)",
                          "write the JSON lines outside the input, e.g. --out results.jsonl")
    policy = _capture_policy(capture, capture_below, capture_random, capture_per_minute, capture_max_mb)
    capture_arg = (capture, policy) if policy else None
    stream = _LazyFile(out) if out else sys.stdout
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    try:
        with Progress(*columns, console=err, transient=True, disable=out is None and sys.stdout.isatty()) as bar:
            task = bar.add_task(f"classifying {escape(source)}", total=total)
            summary = run_infer(spec, bundle=bundle, root=root, backend=backend, precision=precision, k=top_k,
                                every=every, max_fps=max_fps, out=stream, max_reconnects=max_reconnects,
                                threads=threads, on_record=lambda rec: bar.advance(task), capture=capture_arg)
    finally:
        if out is not None:
            stream.close()
    err.print(f"{summary.classified} classified, {summary.errors} error record(s)"
              + (f", written to {escape(str(out))}" if out else "")
              + (f"; scores: softmax(logits / {summary.temperature:g}), the bundle's calibrated temperature"
                 if summary.calibrated else "; scores: plain softmax (the bundle has no calibrated temperature)"))
    if summary.capture is not None:
        c = summary.capture
        err.print(f"captured {sum(c['kept'].values())} picture(s) in {escape(c['folder'])} "
                  f"({', '.join(f'{k} {v}' for k, v in c['kept'].items()) or 'none kept'})"
                  + (f"; [yellow]capture stopped: {escape(c['stopped'])}[/]" if c["stopped"] else ""))
    for problem in summary.training_problems:
        err.print(f"[bold yellow]WARNING: this bundle's training failed ({escape(problem)}): its answers are no "
                  "better than guessing[/]")
    if summary.errors:  # some pictures (files, frames, folders) failed: say so in the exit code
        raise typer.Exit(1)


def serve_cmd(
    bundle: Path = typer.Argument(None, help="Bundle folder or .tar.gz (or use --root)."),
    root: Path = typer.Option(None, help="Serve the model deployed under this root and follow deploys/rollbacks."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 for all)."),
    port: int = typer.Option(8000, help="TCP port."),
    name: str = typer.Option(None, help="Model name in the URLs (default: the bundle manifest's name)."),
    token: str = typer.Option(None, help="Require 'Authorization: Bearer TOKEN' (or set EDGE_TL_TOKEN).",
                              envvar="EDGE_TL_TOKEN", show_envvar=True),
    max_batch: int = typer.Option(1, "--max-batch", help="Dynamic batching: up to N images per runner call (1: off)."),
    max_delay_ms: float = typer.Option(2.0, "--max-delay-ms", help="Dynamic batching: wait at most this long."),
    max_request_bytes: int = typer.Option(32 * 1024 * 1024, "--max-request-bytes", help="Largest request body."),
    max_image_pixels: int = typer.Option(25_000_000, "--max-image-pixels", help="Largest image (width x height)."),
    backend: str = typer.Option("auto", help="auto|tensorrt|ort-trt|ort-cuda|ort-cpu"),
    precision: str = typer.Option(None, help="fp32|int8 (TensorRT also fp16|best); default: the bundle's."),
    workers: int = typer.Option(1, help="Inference threads (concurrent runner calls; TensorRT needs 1)."),
    threads: int = typer.Option(None, help="Intra-op CPU threads for ONNX Runtime."),
    poll: float = typer.Option(1.0, help="With --root: seconds between checks of the active model."),
    graceful_timeout: float = typer.Option(30.0, help="On SIGTERM, seconds in-flight requests may take."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request (costs latency)."),
    idle_timeout: float = typer.Option(5.0, "--idle-timeout",
                                       help="Close a connection this many seconds after it opened or answered, "
                                            "unless a request is in progress (slow/idle clients)."),
    body_timeout: float = typer.Option(60.0, "--body-timeout", help="A request body must arrive within this (408)."),
    max_connections: int = typer.Option(1024, "--max-connections",
                                        help="Open connections at most (lowered to fit the fd limit); the one idle "
                                             "longest is closed to make room."),
    max_inflight_bytes: int = typer.Option(None, "--max-inflight-bytes",
                                           help="Request bytes held at once across requests; others wait "
                                                "(default: --max-request-bytes)."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Load a bundle that is unsigned, signed by a "
                                        "key this machine does not trust, or on a machine that trusts no key yet "
                                        "(edge-tl keys list); warned and counted."),
    capture: Path = CAPTURE, capture_below: float = CAPTURE_BELOW, capture_random: float = CAPTURE_RANDOM,
    capture_per_minute: int = CAPTURE_PER_MINUTE, capture_max_mb: int = CAPTURE_MAX_MB,
) -> None:
    """Serve a bundle over the Open Inference Protocol (KServe v2 / Triton HTTP) with metrics at /metrics."""
    from edge_tl.device.serve.config import ServeConfig
    from edge_tl.device.serve.server import run_server

    run_server(ServeConfig(bundle=bundle, root=root, host=host, port=port, name=name, token=token,
                           max_batch=max_batch, max_delay_ms=max_delay_ms, max_request_bytes=max_request_bytes,
                           max_image_pixels=max_image_pixels, backend=backend, precision=precision, workers=workers,
                           threads=threads, poll_s=poll, graceful_timeout_s=graceful_timeout, access_log=access_log,
                           idle_timeout_s=idle_timeout, body_timeout_s=body_timeout, max_connections=max_connections,
                           max_inflight_bytes=max_inflight_bytes, allow_unsigned=allow_unsigned, capture=capture,
                           capture_policy=_capture_policy(capture, capture_below, capture_random, capture_per_minute,
                                                          capture_max_mb)))


def register(app: typer.Typer) -> None:
    app.command("infer")(infer_cmd)
    app.command("serve")(serve_cmd)
