"""Running the app under uvicorn as a service: logs to stderr (the journal under systemd), graceful SIGTERM."""

from __future__ import annotations

import logging
import sys

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import require
from edge_tl.device.serve.config import ServeConfig

log = logging.getLogger("edge_tl.device.serve")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("edge_tl")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level)


def _limits(config: ServeConfig) -> dict:
    """uvicorn options for the idle timeout and the connection cap; repeated log lines rate-limited."""
    from edge_tl.device.serve.limits import ConnectionLimits, connection_budget, install_log_rate_limit, uvicorn_limits

    install_log_rate_limit()
    cap, backlog = connection_budget(config.max_connections)
    return uvicorn_limits(ConnectionLimits(idle_timeout_s=config.idle_timeout_s, max_connections=cap,
                                           max_body_bytes=config.max_request_bytes), backlog)


def run_server(config: ServeConfig) -> None:
    """Load the model, then serve until SIGTERM/SIGINT; in-flight requests finish first (up to
    ``graceful_timeout_s``), then the model is unloaded."""
    uvicorn = require("uvicorn", "edge-tl serve")
    from edge_tl.device.serve.app import create_app

    setup_logging()
    app = create_app(config)  # raises EdgeTLError before anything listens
    if config.host not in LOOPBACK and not config.token:
        log.warning("listening on %s without a bearer token: anyone who reaches this port can use the model "
                    "(set --token or EDGE_TL_TOKEN)", config.host)
    uconfig = uvicorn.Config(app, host=config.host, port=config.port, lifespan="on", access_log=config.access_log,
                             timeout_graceful_shutdown=int(config.graceful_timeout_s), server_header=False,
                             log_level="info", **_limits(config))
    server = uvicorn.Server(uconfig)
    _default_sigterm()
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise EdgeTLError(f"could not serve on {config.host}:{config.port} (uvicorn exited with {exc.code})",
                          "is the port in use? choose another with --port") from None
    if not server.started:
        raise EdgeTLError(f"the server on {config.host}:{config.port} did not start", "see the log lines above")


def _default_sigterm() -> None:
    """SIGTERM back to the default action for the server: uvicorn handles it (graceful shutdown), then raises it
    again with the previous handler in place, and the process must end by the signal, which systemd counts as a
    clean stop; the CLI's SIGTERM-as-Ctrl-C handler (edge_tl.core.interrupt) would make it exit 143, which systemd
    counts as a failure on every `systemctl stop`."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class ThreadedServer:
    """The app served by uvicorn on a background thread (tests and benchmarks): ``with ThreadedServer(cfg) as
    srv: httpx.get(srv.url + "/v2")``. Port 0 picks a free port; ``stop()`` shuts down gracefully."""

    def __init__(self, config: ServeConfig, app=None):
        import threading

        uvicorn = require("uvicorn", "edge-tl serve")
        from edge_tl.device.serve.app import create_app

        self.app = app if app is not None else create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=config.host, port=config.port, lifespan="on",
                                                    access_log=config.access_log, log_level="warning",
                                                    timeout_graceful_shutdown=int(config.graceful_timeout_s),
                                                    server_header=False, **_limits(config)))
        self.thread = threading.Thread(target=self.server.run, name="edge-tl-serve", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> ThreadedServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise EdgeTLError("the test server did not start", "see the log above")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
