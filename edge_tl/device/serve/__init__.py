"""`edge-tl serve`: an Open Inference Protocol (KServe v2 / Triton) HTTP server for a bundle. See docs/serve.md.

Modules: ``config`` (ServeConfig), ``protocol`` (v2 JSON + Triton's binary tensor extension), ``images``
(safe decoding), ``batching`` (worker threads, dynamic batching), ``models`` (loading, reference counts, hot
reload), ``metrics`` (Prometheus), ``app`` (FastAPI routes, auth, limits), ``server`` (uvicorn, SIGTERM).
"""

from __future__ import annotations

from edge_tl.device.serve.config import ServeConfig

__all__ = ["ServeConfig"]
