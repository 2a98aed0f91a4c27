"""The workstation half of `edge-tl deploy`: pack, upload and drive the device's own edge-tl over SSH.

Every decision that changes the device (verify, engine, gate, switch, restart, rollback) is taken on the device
by ``edge-tl deploy device ...`` under its deploy lock (:mod:`edge_tl.device.deploy.device`); this side only uploads
and reports. The upload is named by the tarball's sha256, so a re-run finds and resumes its own partial file.
"""

from __future__ import annotations

import contextlib
import getpass
import gzip
import json
import os
import socket
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edge_tl.core.bundle import MANIFEST, Bundle, Manifest, refuse_failed_training
from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.fsutil import sha256_file
from edge_tl.device.deploy.service import ServiceOptions
from edge_tl.workstation.ship.transport import Notify, Progress, SSHSession, UploadResult

DEFAULT_REMOTE_ROOT = "/opt/edge-tl"


@dataclass
class Prepared:
    tarball: Path
    manifest: Manifest
    sha256: str


def _pack(src: Path, dest: Path) -> Path:
    """A reproducible .tar.gz of ``src`` (sorted, mtime 0, owner 0), so re-packing gives the same bytes and a
    re-run resumes the same upload."""
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in [src, *sorted(src.rglob("*"))]:
            info = tar.gettarinfo(str(path), arcname=str(PurePosixPath(src.name, path.relative_to(src).as_posix())))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if info.isdir() else 0o644
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return dest


@contextlib.contextmanager
def prepare(bundle: Path, *, verify: bool = True) -> Iterator[Prepared]:
    """The bundle as a .tar.gz ready to upload (a folder is packed into a temporary file), checked here first
    unless ``verify`` is False (then only the device checks it)."""
    bundle = Path(bundle)
    with tempfile.TemporaryDirectory(prefix="edge-tl-deploy-") as tmp:
        if bundle.is_file() and not verify:
            yield Prepared(bundle, _tar_manifest(bundle), sha256_file(bundle))
            return
        opened = Bundle.open(bundle, extract_to=Path(tmp) / "x", verify=verify)
        if bundle.is_dir():
            tarball = _pack(opened.root, Path(tmp) / f"{opened.manifest.bundle_id}.tar.gz")
        else:
            tarball = bundle
        yield Prepared(tarball, opened.manifest, sha256_file(tarball))


def _tar_manifest(tarball: Path) -> Manifest:
    """The manifest inside a bundle .tar.gz, read without unpacking anything else."""
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if len(parts) == 2 and parts[1] == MANIFEST and member.isfile():
                    return Manifest.model_validate_json(tar.extractfile(member).read())  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, ValueError, EOFError, zlib.error) as exc:
        raise EdgeTLError(f"cannot read the manifest in {tarball} ({exc or type(exc).__name__})",
                          "give the bundle edge-tl build wrote") from exc
    raise EdgeTLError(f"{tarball} holds no <bundle>/{MANIFEST}", "give the bundle edge-tl build wrote")


class RemoteDevice:
    """The device's ``edge-tl deploy device ...`` commands, run over an SSH session."""

    def __init__(self, session: SSHSession, root: str = DEFAULT_REMOTE_ROOT, remote_edge_tl: str = "edge-tl",
                 notify: Notify | None = None):
        if not root.startswith("/"):
            raise EdgeTLError(f"--root {root} is not an absolute path", "give the device folder, e.g. /opt/edge-tl")
        self.session, self.root, self.remote_edge_tl = session, root, remote_edge_tl
        self.notify = notify or (lambda _msg: None)

    def call(self, command: str, *args: str) -> dict[str, Any]:
        """Run one device command; its JSON result (last stdout line), or its error re-raised here."""
        target = self.session.target

        def relay(line: str) -> None:
            if line.strip() and not line.startswith("error:"):
                self.notify(f"[{target.host}] {line}")

        argv = [self.remote_edge_tl, "deploy", "device", command, "--root", self.root, *args]
        res = self.session.run(argv, on_stderr=relay)
        if res.rc == 127:
            raise EdgeTLError(f"edge-tl was not found on {target} (ran '{self.remote_edge_tl}')",
                              "install it there (deploy/bootstrap.sh) or pass --remote-edge-tl "
                              "/path/to/venv/bin/edge-tl")
        if res.rc != 0:
            errors = [ln.removeprefix("error:").strip() for ln in res.stderr.splitlines()
                      if ln.startswith(("error:", "internal error"))]
            last = errors[-1] if errors else (res.stderr.strip().splitlines() or [f"exit {res.rc}"])[-1]
            cls = CheckFailed if res.rc == 3 else EdgeTLError
            raise cls(f"on {target}: {last}", exit_code=res.rc if res.rc in (2, 3) else 2)
        lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            raise EdgeTLError(f"`edge-tl deploy device {command}` on {target} printed no result",
                              "check that the device's edge-tl is the same version as this one") from None

    def prepare(self, need_bytes: int) -> dict[str, Any]:
        return self.call("prepare", "--need-bytes", str(need_bytes))

    def upload(self, prep: Prepared, *, method: str = "auto", progress: Progress | None = None
               ) -> tuple[str, UploadResult]:
        info = self.prepare(prep.tarball.stat().st_size)
        remote = f"{info['uploads']}/{prep.sha256[:16]}-{prep.manifest.bundle_id}.tar.gz"
        if info.get("active") == prep.manifest.bundle_id:  # nothing to send; install says "already active"
            return remote, UploadResult("none", 0, 0)

        def remote_sha256(path: str) -> str | None:
            return self.call("file-info", "--path", path).get("sha256")

        result = self.session.upload(prep.tarball, remote, method=method, progress=progress,
                                     remote_sha256=remote_sha256)
        return remote, result

    def install(self, remote: str, prep: Prepared, *, precision: str | None = None, backend: str = "auto",
                build_via: str = "api", keep: int = 3, lock_timeout: float = 600.0,
                svc: ServiceOptions | None = None, origin: str | None = None,
                allow_failed_training: bool = False, allow_unsigned: bool = False) -> dict[str, Any]:
        args = ["--upload", remote, "--sha256", prep.sha256, "--bundle-id", prep.manifest.bundle_id,
                "--backend", backend, "--build-via", build_via, "--keep", str(keep),
                "--lock-timeout", f"{lock_timeout:g}", *(svc or ServiceOptions()).to_args()]
        if precision:
            args += ["--precision", precision]
        if origin:
            args += ["--origin", origin]
        if allow_failed_training:
            args += ["--allow-failed-training"]
        if allow_unsigned:
            args += ["--allow-unsigned"]
        return self.call("install", *args)

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def trust(self, key_line: str) -> dict[str, Any]:
        """Pin the first signing key this device trusts (refused there where it trusts one already)."""
        return self.call("trust", "--key", key_line.strip())

    def rollback(self, *, version: str | None = None, lock_timeout: float = 600.0,
                 svc: ServiceOptions | None = None) -> dict[str, Any]:
        args = ["--lock-timeout", f"{lock_timeout:g}", *(svc or ServiceOptions()).to_args()]
        return self.call("rollback", *args, *(["--version", version] if version else []))


def read_public_key(path: Path) -> str:
    """The ``.pub`` line at ``path``, checked here before anything is sent."""
    from edge_tl.core.signing import read_public_file

    return read_public_file(path, f"--trust-key {path}")[2]


def push(device: RemoteDevice, bundle: Path, *, precision: str | None = None, backend: str = "auto",
         build_via: str = "api", keep: int = 3, lock_timeout: float = 600.0, svc: ServiceOptions | None = None,
         transfer: str = "auto", progress: Progress | None = None, verify_local: bool = True,
         on_uploaded: Callable[[UploadResult], None] | None = None, allow_failed_training: bool = False,
         allow_unsigned: bool = False, on_warning: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Deploy ``bundle`` (folder or .tar.gz) to ``device``: upload (resumable), then install there. A bundle
    whose training failed is refused here, before anything is sent, unless ``allow_failed_training``."""
    origin = f"{getpass.getuser()}@{socket.gethostname()}:{os.path.abspath(bundle)}"
    with prepare(bundle, verify=verify_local) as prep:
        warning = refuse_failed_training(prep.manifest, allow_failed_training)
        if warning and on_warning:
            on_warning(warning)
        remote, uploaded = device.upload(prep, method=transfer, progress=progress)
        if on_uploaded:
            on_uploaded(uploaded)
        result = device.install(remote, prep, precision=precision, backend=backend, build_via=build_via, keep=keep,
                                lock_timeout=lock_timeout, svc=svc, origin=origin,
                                allow_failed_training=allow_failed_training, allow_unsigned=allow_unsigned)
    result["upload"] = {"method": uploaded.method, "resumed_from": uploaded.resumed_from, "bytes": uploaded.size}
    return result
