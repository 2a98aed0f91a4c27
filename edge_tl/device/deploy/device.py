"""The device half of `edge-tl deploy`: install an uploaded bundle, report status, roll back.

Runs on the Jetson through its own edge-tl (the workstation calls ``edge-tl deploy device ...`` over SSH).
Imports neither torch nor paramiko. Install, under the deploy lock:

1. check the upload's sha256 (a transfer that went wrong is deleted, so the next run starts clean);
2. unpack it with :func:`edge_tl.core.fsutil.safe_extract` (no absolute paths, ``..``, links, device files) into a
   staging folder and verify every artifact against the manifest (:meth:`Bundle.verify`);
3. build the engine (TensorRT) and run the parity gate (see :mod:`edge_tl.device.deploy.gate`);
4. only then switch ``active`` atomically, restart the field service and wait for it to be healthy (else switch
   back by itself), and prune to the last ``keep`` versions.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from edge_tl import __version__
from edge_tl.core.bundle import Bundle, refuse_failed_training, utc_now
from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.fsutil import chmod_default, safe_extract, sha256_file
from edge_tl.core.layout import DeviceLayout
from edge_tl.core.signing import enforce as enforce_signature
from edge_tl.device.deploy import gate, service, state
from edge_tl.device.runtime import available_backends


def say(msg: str) -> None:
    """Progress for the workstation (stderr; stdout carries the JSON result). Best effort: when the workstation
    has gone (a dropped connection), the install still runs to its end, health check and rollback included."""
    try:
        print(msg, file=sys.stderr, flush=True)
    except OSError:
        pass


def prepare(root: str | Path, need_bytes: int = 0) -> dict[str, Any]:
    """Create the upload folder and check there is room for a bundle of ``need_bytes`` (about 3x: upload,
    unpacked, engine); report this edge-tl's version, the free space and the active version."""
    layout = DeviceLayout(root)
    state.check_root(layout)
    uploads = state.uploads_dir(layout)
    try:
        uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise EdgeTLError(f"cannot create {uploads} ({exc.strerror})",
                          f"create {root} for the deploy user: sudo install -d -o $USER {root}") from exc
    free = shutil.disk_usage(uploads).free
    if need_bytes and free < 3 * need_bytes:
        raise EdgeTLError(f"{root} has {free >> 20} MiB free, a {need_bytes >> 20} MiB bundle needs about "
                          f"{3 * need_bytes >> 20} MiB (upload, unpacked, engine)",
                          "free space on the device or lower --keep")
    return {"uploads": str(uploads), "edge_tl_version": __version__, "free_bytes": free,
            "active": layout.active_version()}


def upload_file_info(root: str | Path, path: Path) -> dict[str, Any]:
    """:func:`file_info` of a file in the upload folder (and nowhere else)."""
    if Path(path).resolve().parent != state.uploads_dir(DeviceLayout(root)).resolve():
        raise EdgeTLError(f"{path} is not in the upload folder", "this command only reads uploads")
    return file_info(Path(path))


def file_info(path: Path) -> dict[str, Any]:
    """Size and sha256 of a (partial) upload, for resuming an SFTP transfer."""
    if not path.is_file():
        return {"path": str(path), "size": None, "sha256": None}
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}


def _unpack(layout: DeviceLayout, upload: Path, expected_id: str | None) -> tuple[Path, Bundle]:
    """Unpack and verify into a staging folder; returns (staging, bundle)."""
    layout.versions_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=layout.versions_dir))
    try:
        chmod_default(staging, directory=True)  # it may become the bundle folder: readable by the service
        top = safe_extract(upload, staging)
        bundle = Bundle.open(top)
        bundle.verify()
        bid = bundle.manifest.bundle_id
        if bid != bundle.expected_id() or not state.VERSION_RE.match(bid):
            raise CheckFailed(f"the manifest's bundle_id '{bid}' does not match its artifacts", "rebuild the bundle")
        if expected_id and bid != expected_id:
            raise CheckFailed(f"the upload holds bundle {bid}, not {expected_id}", "re-run edge-tl deploy")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"verified {len(bundle.manifest.artifacts)} artifacts of {bundle.manifest.name} ({bid}) against the manifest")
    return staging, bundle


def _place(layout: DeviceLayout, bundle: Bundle, staging: Path, record: dict[str, Any]) -> Path | None:
    """Move the verified bundle to versions/<id>/bundle (an inactive older copy is moved aside); returns it."""
    version = bundle.manifest.bundle_id
    vdir = layout.version_dir(version)
    aside = None
    if vdir.exists():
        aside = layout.versions_dir / f".old-{version}-{os.getpid()}"
        os.replace(vdir, aside)
    vdir.mkdir()
    state.update_record(layout, version, status="installing", **record)
    os.replace(bundle.root, layout.bundle_dir(version))
    shutil.rmtree(staging, ignore_errors=True)
    return aside


def _restore(layout: DeviceLayout, version: str, aside: Path | None) -> None:
    shutil.rmtree(layout.version_dir(version), ignore_errors=True)
    if aside is not None:
        os.replace(aside, layout.version_dir(version))


def install(root: Path, upload: Path, *, sha256: str | None = None, bundle_id: str | None = None,
            precision: str | None = None, backend: str = "auto", build_via: str = "api", keep: int = 3,
            lock_timeout: float = 600.0, origin: str | None = None,
            svc: service.ServiceOptions | None = None, allow_failed_training: bool = False,
            allow_unsigned: bool = False) -> dict[str, Any]:
    """Install ``upload`` (a bundle .tar.gz already on this device) and activate it; see the module doc."""
    if keep < 1:
        raise EdgeTLError(f"--keep {keep} must be at least 1", "keep 3 (the default) or more")
    layout, svc = DeviceLayout(Path(root).absolute()), svc or service.ServiceOptions()
    # only an upload edge-tl made (in the root's upload folder) is consumed: a file given from elsewhere (a
    # build's own bundle.tar.gz, issue 24) is the user's and is never deleted
    ours = Path(upload).absolute().parent.resolve() == state.uploads_dir(layout).resolve()
    with state.deploy_lock(layout, lock_timeout, "install", notify=say):
        state.clean_leftovers(layout)
        if bundle_id and layout.active_version() == bundle_id:
            if ours:
                upload.unlink(missing_ok=True)
            say(f"{bundle_id} is already the active version; nothing to do")
            return {"status": "already-active", "bundle_id": bundle_id, "root": str(layout.root)}
        if not upload.is_file():
            raise EdgeTLError(f"the upload {upload} is not on the device", "re-run edge-tl deploy to upload it")
        try:  # an upload is consumed whatever happens now (only a transfer cut short is resumed)
            return _install_upload(layout, upload, sha256, bundle_id, precision, backend, build_via, keep, origin,
                                   svc, allow_failed_training, allow_unsigned)
        finally:
            if ours:
                upload.unlink(missing_ok=True)


def _install_upload(layout: DeviceLayout, upload: Path, sha256: str | None, bundle_id: str | None,
                    precision: str | None, backend: str, build_via: str, keep: int, origin: str | None,
                    svc: service.ServiceOptions, allow_failed_training: bool = False,
                    allow_unsigned: bool = False) -> dict[str, Any]:
    if sha256 and sha256_file(upload) != sha256:
        raise CheckFailed(f"the uploaded {upload.name} does not match its sha256 (damaged in transit); "
                          "it was deleted", "re-run edge-tl deploy: the transfer starts over")
    staging, bundle = _unpack(layout, upload, bundle_id)
    version, manifest = bundle.manifest.bundle_id, bundle.manifest
    try:
        signature = bundle.signature()  # against this device's trusted keys (edge_tl.core.signing)
        signature_warning = enforce_signature(signature, allow_unsigned, f"bundle {manifest.name} ({version})")
        training_warning = refuse_failed_training(manifest, allow_failed_training)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"signature: {signature.state}" + (f" ({signature.detail})" if signature.detail else ""))
    for warning in (signature_warning, training_warning):
        if warning:
            say(("WARNING: " if warning is signature_warning else "") + warning)
    if version == layout.active_version():
        shutil.rmtree(staging, ignore_errors=True)
        return {"status": "already-active", "bundle_id": version, "root": str(layout.root)}
    plan = gate.plan_gate(backend, precision or manifest.default_precision, build_via, available_backends())
    plan.notes += [w for w in (signature_warning, training_warning) if w]
    for note in plan.notes:
        say(f"note: {note}")
    ssh_client = os.environ.get("SSH_CLIENT", "").split(" ")[0] or None  # the workstation's address
    record = {"bundle_id": version, "name": manifest.name, "summary": manifest.summary(),
              "installed_at": utc_now(), "origin": origin, "ssh_client": ssh_client,
              "precision": plan.precision, "gate_backend": plan.backend, "notes": plan.notes, "engine": None,
              "signature": signature.as_dict()}
    aside = _place(layout, bundle, staging, record)
    bdir, edir = layout.bundle_dir(version), layout.engine_dir(version)
    try:
        if plan.build_engine:
            say(f"building the {plan.precision} engine (edge-tl engine build, via {plan.build_via})")
            engine = gate.build_engine(bdir, edir, plan)
            state.update_record(layout, version, engine=engine)
        say(f"parity gate: {plan.precision} on {plan.backend}")
        report = gate.run_gate(bdir, edir, layout.version_dir(version) / state.PARITY, plan)
    except BaseException:
        _restore(layout, version, aside)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    parity = gate.parity_summary(report)
    state.update_record(layout, version, status="installed", parity=parity)
    say(f"parity passed: {parity.get('summary')}")
    result = _switch_and_check(layout, version, manifest.name, svc, "deploy")
    result["pruned"] = state.prune(layout, keep, notify=say)
    result.update(parity=parity, engine=state.read_record(layout, version).get("engine"), notes=plan.notes)
    return result


def _switch_and_check(layout: DeviceLayout, version: str, model_name: str | None, svc: service.ServiceOptions,
                      why: str, stack_before: list[str] | None = None) -> dict[str, Any]:
    """Activate ``version``; restart the service and wait for health; on failure switch back (active link and
    history as they were: ``stack_before``, default the stack now) and raise."""
    stack_before = state.read_stack(layout) if stack_before is None else stack_before
    before = state.activate(layout, version)
    state.update_record(layout, version, status="active", activated_at=utc_now())
    state.add_event(layout, version, f"activated ({why})", previous=before)
    if before:
        state.update_record(layout, before, status="installed")
    say(f"switched {layout.active_link} -> {version} (was {before or 'nothing'})")
    result: dict[str, Any] = {"status": "activated", "bundle_id": version, "previous": before,
                              "root": str(layout.root), "service": {"restarted": False}}
    cmd = service.restart_command(svc)
    if cmd is None:
        result["service"]["note"] = "restart off" if not svc.restart else f"no active {service.UNIT}; not restarted"
        return result
    say(f"restarting the field service ({' '.join(cmd)}) and waiting for {svc.health_url}")
    try:
        service.run_restart(cmd)
        health = service.wait_healthy(svc, version, model_name)
    except EdgeTLError as exc:
        health = {"healthy": False, "reason": exc.one_line()}
    result["service"] = {"restarted": True, **health}
    if health["healthy"]:
        say(f"service healthy: {health['reason']}")
        return result
    say(f"service NOT healthy on {version}: {health['reason']}; switching back to {before or 'nothing'}")
    state.switch(layout, before if before and layout.bundle_dir(before).is_dir() else None)
    state.write_stack(layout, stack_before)
    state.update_record(layout, version, status="rolled-back", health=health)
    state.add_event(layout, version, "rolled back: health check failed", reason=health["reason"])
    if before:
        state.update_record(layout, before, status="active")
        state.add_event(layout, before, "re-activated after a failed health check", failed=version)
    back = "not restarted"
    try:
        service.run_restart(cmd)
        again = service.wait_healthy(svc, before, state.read_record(layout, before).get("name") if before else None)
        back = "healthy again" if again["healthy"] else f"still unhealthy: {again['reason']}"
    except EdgeTLError as exc:
        back = f"restart failed: {exc.one_line()}"
    raise CheckFailed(f"the field service did not become healthy on {version} ({health['reason']}); rolled back to "
                      f"{before or 'no active version'} (service {back})",
                      "check the service's log (journalctl -u edge-tl-serve) and --health-url")


def rollback(root: Path, *, version: str | None = None, lock_timeout: float = 600.0,
             svc: service.ServiceOptions | None = None) -> dict[str, Any]:
    """Switch back to the previous version (or to ``version``, any kept one) atomically."""
    layout, svc = DeviceLayout(Path(root).absolute()), svc or service.ServiceOptions()
    with state.deploy_lock(layout, lock_timeout, "rollback", notify=say):
        state.clean_leftovers(layout)
        current = layout.active_version()
        target = state.check_version_id(version) if version else state.previous_version(layout)
        if target is None:
            raise EdgeTLError(f"there is no previous version to roll back to under {layout.root}",
                              "see edge-tl deploy status; deploy the version you want instead")
        if target == current:
            raise EdgeTLError(f"{target} is already the active version", "name another with --version")
        if not layout.bundle_dir(target).is_dir():
            raise EdgeTLError(f"version {target} is not kept on the device", "see edge-tl deploy status")
        stack = state.read_stack(layout)
        if current and not version:
            # a rollback takes the current version off the stack, so the next rollback goes further back
            state.write_stack(layout, [v for v in stack if v != current])
        result = _switch_and_check(layout, target, state.read_record(layout, target).get("name"), svc, "rollback",
                                   stack_before=stack)
        if current:
            state.update_record(layout, current, status="rolled-back" if not version else "installed")
            state.add_event(layout, current, "rolled back", to=target)
        result["status"], result["previous"] = "rolled-back", current
        return result


def status(root: Path) -> dict[str, Any]:
    """What is active, what rollback would switch to, every kept version (no lock: reads are consistent)."""
    layout = DeviceLayout(Path(root).absolute())
    active = layout.active_version()
    out: dict[str, Any] = {"root": str(layout.root), "active": active,
                           "previous": state.previous_version(layout), "versions": []}
    for version in state.installed_versions(layout):
        rec = state.read_record(layout, version)
        out["versions"].append({
            "bundle_id": version, "active": version == active, "status": rec.get("status"),
            "name": rec.get("name"), "summary": rec.get("summary"), "installed_at": rec.get("installed_at"),
            "activated_at": rec.get("activated_at"), "origin": rec.get("origin"), "precision": rec.get("precision"),
            "gate_backend": rec.get("gate_backend"), "engine_key": (rec.get("engine") or {}).get("key_digest"),
            "engine": (rec.get("engine") or {}).get("path"), "parity": rec.get("parity"), "notes": rec.get("notes"),
        })
    return out
