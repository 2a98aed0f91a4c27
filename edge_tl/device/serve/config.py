"""What `edge-tl serve` was asked to do (one object the app, the CLI and the tests share)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_tl.core.errors import EdgeTLError

TOKEN_ENV = "EDGE_TL_TOKEN"


@dataclass
class ServeConfig:
    bundle: Path | None = None  # serve this bundle (dir or .tar.gz) ...
    root: Path | None = None  # ... or the active deployed model under this root, hot-reloaded
    host: str = "127.0.0.1"
    port: int = 8000
    name: str | None = None  # model name in the URLs; default: the manifest's name
    token: str | None = None  # bearer token; None = no authentication
    max_batch: int = 1  # > 1 turns dynamic batching on
    max_delay_ms: float = 2.0
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    backend: str = "auto"
    precision: str | None = None
    workers: int = 1  # inference threads (concurrent runner calls)
    threads: int | None = None  # intra-op threads of the ONNX Runtime session
    poll_s: float = 1.0  # how often --root's `active` link is checked
    graceful_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    verify: bool = True  # check the bundle's hashes before serving it
    allow_unsigned: bool = False  # load a bundle unsigned / signed by an untrusted key / on a machine trusting none
    capture: Path | None = None  # keep /classify's unsure pictures here (edge_tl.device.capture)
    capture_policy: Any = None  # edge_tl.device.capture.CapturePolicy (None: its defaults)
    access_log: bool = False
    idle_timeout_s: float = 5.0  # a connection with no request in progress (headers incomplete, keep-alive) closes
    body_timeout_s: float = 60.0  # a request body must arrive within this (else 408)
    max_connections: int = 1024  # open connections at most (kept below the fd limit); the longest idle makes room
    max_inflight_bytes: int | None = None  # request bytes held at once across requests (default: max_request_bytes)

    def __post_init__(self) -> None:
        if self.token is None:
            self.token = os.environ.get(TOKEN_ENV) or None
        if (self.bundle is None) == (self.root is None):
            raise EdgeTLError("give a BUNDLE or --root (not both)", "edge-tl serve BUNDLE, or edge-tl serve --root "
                              "/opt/edge-tl to serve the deployed model")
        if self.bundle is not None:
            self.bundle = Path(self.bundle)
        if self.root is not None:
            self.root = Path(self.root)
            if not self.root.is_dir():
                raise EdgeTLError(f"--root {self.root} is not a folder", "give the root that edge-tl deploy uses")
        if self.max_inflight_bytes is None:
            self.max_inflight_bytes = self.max_request_bytes
        for field, value, low in (("--max-batch", self.max_batch, 1), ("--workers", self.workers, 1),
                                  ("--max-request-bytes", self.max_request_bytes, 1024),
                                  ("--max-image-pixels", self.max_image_pixels, 1), ("--port", self.port, 0),
                                  ("--max-connections", self.max_connections, 1),
                                  ("--max-inflight-bytes", self.max_inflight_bytes, 1024)):
            if value < low:
                raise EdgeTLError(f"{field} must be >= {low} (got {value})", f"pass a {field} of at least {low}")
        for field, value in (("--idle-timeout", self.idle_timeout_s), ("--body-timeout", self.body_timeout_s)):
            if not value > 0:
                raise EdgeTLError(f"{field} must be > 0 seconds (got {value})", f"pass e.g. {field} 5")
        if self.port > 65535:
            raise EdgeTLError(f"--port must be a TCP port, 0..65535 (got {self.port})", "pass e.g. --port 8000")
        for field, value in (("--max-delay-ms", self.max_delay_ms), ("--poll", self.poll_s),
                             ("--graceful-timeout", self.graceful_timeout_s)):
            if not math.isfinite(value) or value < 0:
                raise EdgeTLError(f"{field} must be a finite number >= 0 (got {value})", f"pass e.g. {field} 2")
        if self.token is not None and len(self.token) < 8:
            raise EdgeTLError("the bearer token is shorter than 8 characters", "use a long random token "
                              "(e.g. `openssl rand -hex 24`)")

    @property
    def batching(self) -> bool:
        return self.max_batch > 1
