"""Issue 24 targets: what signing adds to opening a bundle, how a thin image is refused, and what one stalled
chunked request does to everyone else. Writes the ``signing`` section of benchmarks/RESULTS.md.

    python benchmarks/bench_signing.py [BUNDLE]     # default runs/demo/bundle (make demo)

Opening: a copy of BUNDLE signed with a fresh Ed25519 key, opened (hashes verified) and its signature checked
against a trust folder holding that key, 20 times; against opening alone. Thin image: the serve decoder on a
2 KB PNG of 1 x 2,000,000 px (issue 24's probe), time and peak RSS growth, in a fresh process; then the same PNG
POSTed to `edge-tl serve` of the signed copy (its own process, trusting the key): status, time, the server's RSS.
Stalled request: a chunked /infer request that sends one byte of its body and then nothing, held open while 32
clients send /infer requests for 10 s (against 10 s of the same load without it): their p99.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import machine_line, write_section  # noqa: E402
from bench_serve import Server, rss_mb, run_load  # noqa: E402

from edge_tl.core.bundle import Bundle  # noqa: E402
from edge_tl.core.signing import generate_key, load_private_key, sign_folder, trusted_keys  # noqa: E402

THIN = """
import io, resource, time, json
from PIL import Image
from edge_tl.device.serve.images import decode_image
from edge_tl.device.serve.protocol import ProtocolError
buf = io.BytesIO(); Image.new("L", (1, 2_000_000)).save(buf, format="PNG", optimize=True); data = buf.getvalue()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    decode_image(data, 25_000_000); status = 200
except ProtocolError as exc:
    status = exc.status
ms = 1000 * (time.perf_counter() - t0)
print(json.dumps({"bytes": len(data), "status": status, "ms": ms,
                  "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}))
"""


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve_probes(bundle: Path, trust: Path) -> dict:
    """The thin PNG and the stalled chunked request against `edge-tl serve` of ``bundle`` (which ``trust`` signs)."""
    import http.client
    import io
    import os
    import socket

    from PIL import Image

    os.environ["EDGE_TL_TRUSTED_KEYS"] = str(trust)  # the server process is this machine's "device"
    m = Bundle.open(bundle).manifest
    shape = (1, 3, *(int(d) for d in m.input.shape[2:]))
    buf = io.BytesIO()
    Image.new("L", (1, 2_000_000)).save(buf, format="PNG", optimize=True)
    server = Server(bundle, [])
    try:
        run_load(server.port, m.name, shape, 4, 2.0)  # warm-up
        rss0, hwm0 = rss_mb(server.proc.pid), _hwm_mb(server.proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        t0 = time.perf_counter()
        conn.request("POST", f"/v2/models/{m.name}/classify", body=buf.getvalue(),
                     headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        resp.read()
        thin = {"status": resp.status, "ms": 1000 * (time.perf_counter() - t0),
                "rss_growth_mb": rss_mb(server.proc.pid) - rss0, "hwm_growth_mb": _hwm_mb(server.proc.pid) - hwm0}
        conn.close()
        quiet = run_load(server.port, m.name, shape, 32, 10.0)
        stall = socket.create_connection(("127.0.0.1", server.port))
        stall.sendall(f"POST /v2/models/{m.name}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      "application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{".encode())
        time.sleep(0.5)
        stalled = run_load(server.port, m.name, shape, 32, 10.0)
        stall.close()
    finally:
        server.stop()
    return {"thin": thin, "quiet": quiet, "stalled": stalled}


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/bundle")
    if not (src / "manifest.json").is_file():
        raise SystemExit(f"{src} is not a bundle folder: run make demo first, or pass one")
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        bundle = Path(shutil.copytree(src, td / "bundle"))
        key_path, pub, kid = generate_key(td / "k.key")
        trust = td / "trust"
        trust.mkdir()
        shutil.copy(pub, trust / f"{kid}.pub")
        sign_folder(bundle, Bundle.open(bundle).digest, load_private_key(key_path))
        plain, signed = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            b = Bundle.open(bundle)
            t1 = time.perf_counter()
            state = b.signature(trusted_keys([trust])).state  # what signing adds: keys, digest, Ed25519 verify
            signed.append(time.perf_counter() - t1)
            plain.append(t1 - t0)
        if state != "verified":
            raise SystemExit(f"signature {state}")
        size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
        served = serve_probes(bundle, trust)
    thin = json.loads(subprocess.run([sys.executable, "-c", THIN], capture_output=True, text=True,
                                     check=True).stdout)
    med_p, med_s = 1000 * statistics.median(plain), 1000 * statistics.median(signed)
    lines = ["## Signed bundles and thin images (issue 24)", "", machine_line(), "",
             f"- Opening the bundle {src.parent.name}/{src.name} ({size / 2**20:.1f} MiB; every artifact's sha256 "
             f"verified): median {med_p:.1f} ms; checking its Ed25519 signature against a trusted key (reading "
             f"the key and signature.json, the manifest digest, the verification) adds a median {med_s:.2f} ms, "
             f"worst {1000 * max(signed):.2f} ms (target < 50 ms; 20 runs).",
             f"- A {thin['bytes']} B PNG of 1 x 2,000,000 px sent to serve's decoder: HTTP {thin['status']} in "
             f"{thin['ms']:.1f} ms, peak RSS growth {thin['rss_growth_mb']:.1f} MB (targets < 100 ms, < 50 MB): "
             "refused from its header, before decoding.",
             f"- The same PNG POSTed to `edge-tl serve` of this bundle (/classify): HTTP {served['thin']['status']} "
             f"in {served['thin']['ms']:.1f} ms; the server's RSS grew {served['thin']['rss_growth_mb']:+.1f} MB "
             f"(its peak {served['thin']['hwm_growth_mb']:+.1f} MB).",
             "- One stalled chunked /infer request (1 byte of body, then silence) held open while 32 clients send "
             f"/infer for 10 s: {served['stalled']['requests']} requests, {served['stalled']['errors']} errors, "
             f"p50 {served['stalled']['client_p50']:.1f} ms, **p99 {served['stalled']['client_p99']:.1f} ms** "
             f"(target < 1 s); the same load without it: p50 {served['quiet']['client_p50']:.1f} ms, p99 "
             f"{served['quiet']['client_p99']:.1f} ms. The byte budget reserves what arrives, not "
             "--max-request-bytes, so the stalled request holds 1 byte of it until --body-timeout."]
    write_section("signing", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
