"""Issue 24 targets: what signing adds to opening a bundle, and how a thin image is refused. Writes the
``signing`` section of benchmarks/RESULTS.md.

    python benchmarks/bench_signing.py [BUNDLE]     # default runs/demo/bundle (make demo)

Opening: a copy of BUNDLE signed with a fresh Ed25519 key, opened (hashes verified) and its signature checked
against a trust folder holding that key, 20 times; against opening alone. Thin image: the serve decoder on a
2 KB PNG of 1 x 2,000,000 px (issue 24's probe), time and peak RSS growth, in a fresh process.
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
             "refused from its header, before decoding."]
    write_section("signing", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
