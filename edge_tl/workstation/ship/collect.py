"""`edge-tl collect`: bring the pictures a device captured (edge_tl.device.capture) to the workstation.

Over the deploy's SSH connection (SFTP), for every committed capture on the device (an image with its JSON sidecar;
a picture without a sidecar is still being written, or was cut short: left alone):

1. the sidecar and the image are downloaded to temporary files and the image's sha256 and size are checked against
   the sidecar; a mismatch (truncated or tampered on the device) is reported and the device's files are kept;
2. verified pictures are stored under ``OUT/<sha256[:16]><ext>`` with a sidecar that adds the provenance (host,
   remote path, when it was collected); a picture already there (same content, from this host, another host or an
   earlier run) is counted as a duplicate and not stored twice;
3. only then, and only for the pictures verified here, the device's copies are removed (the sidecar first, so a
   cut connection never leaves a committed capture without its image), unless ``keep_remote``.

Nothing on the workstation is overwritten: files are written through temporary names and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import require
from edge_tl.device.capture import SIDECAR_SUFFIX, TMP_PREFIX
from edge_tl.workstation.ship.transport import SSHSession

MAX_IMAGE_BYTES = 64 << 20  # a sidecar claiming more is not one of ours


@dataclass
class CollectResult:
    host: str
    remote_dir: str
    collected: list[str] = field(default_factory=list)  # local files written
    duplicates: int = 0
    removed_remote: int = 0
    problems: list[str] = field(default_factory=list)  # one line per capture left on the device, and why

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_remote(sftp, path: str, limit: int) -> bytes:
    with sftp.open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def collect(session: SSHSession, remote_dir: str, out: Path, *, keep_remote: bool = False) -> CollectResult:
    """Pull every committed capture from ``remote_dir`` on the connected device into ``out``."""
    paramiko = require("paramiko", "edge-tl collect")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = CollectResult(str(session.target), remote_dir)
    try:
        sftp = session.client.open_sftp()
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise EdgeTLError(f"cannot open SFTP on {session.target}: {exc}", "check the device's sshd (sftp)") from None
    try:
        try:
            names = sorted(sftp.listdir(remote_dir))
        except FileNotFoundError:
            raise EdgeTLError(f"{remote_dir} does not exist on {session.target}",
                              "give the folder serve/infer --capture writes to") from None
        for name in names:
            if name.startswith(TMP_PREFIX) or not name.endswith(SIDECAR_SUFFIX):
                continue
            _one(sftp, session, remote_dir, name, out, keep_remote, res)
    finally:
        sftp.close()
    return res


def _one(sftp, session: SSHSession, remote_dir: str, name: str, out: Path, keep_remote: bool,
         res: CollectResult) -> None:
    side_path = posixpath.join(remote_dir, name)
    try:
        meta = json.loads(_read_remote(sftp, side_path, 1 << 20))
        image = str(meta["image"])
        digest, size = str(meta["sha256"]), int(meta["bytes"])
        if "/" in image or image.startswith(".") or size > MAX_IMAGE_BYTES:
            raise ValueError("its image name or size is not one capture writes")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        res.problems.append(f"{side_path}: not a capture sidecar ({exc}); left on the device")
        return
    img_path = posixpath.join(remote_dir, image)
    try:
        blob = _read_remote(sftp, img_path, MAX_IMAGE_BYTES)
    except (OSError, ValueError) as exc:
        res.problems.append(f"{img_path}: cannot be read ({exc}); left on the device")
        return
    got = hashlib.sha256(blob).hexdigest()
    if got != digest or len(blob) != size:
        res.problems.append(f"{img_path}: {len(blob)} bytes with sha256 {got[:12]}, its sidecar says {size} bytes "
                            f"{digest[:12]} (truncated or tampered); left on the device")
        return
    ext = posixpath.splitext(image)[1] or ".bin"
    local = out / f"{digest[:16]}{ext}"
    if local.exists():
        res.duplicates += 1
    else:
        meta = {**meta, "collected_from": str(session.target), "remote_path": img_path,
                "collected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _atomic_write(local, blob)
        _atomic_write(local.with_suffix(local.suffix + SIDECAR_SUFFIX), (json.dumps(meta, indent=1) + "\n").encode())
        res.collected.append(str(local))
    if keep_remote:
        return
    try:  # verified here (stored or already stored): the device's copies may go, the commit mark first
        sftp.remove(side_path)
        sftp.remove(img_path)
        res.removed_remote += 1
    except OSError as exc:
        res.problems.append(f"{img_path}: copied and verified, but not removed from the device ({exc})")
