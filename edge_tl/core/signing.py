"""Signed bundles: Ed25519 signatures over the manifest, checked against public keys the device trusts.

Why Ed25519 through ``cryptography`` (PyCA): one small, fast, deterministic signature scheme from the library the
Python ecosystem keeps for this (wheels for aarch64 and Python 3.10, as on JetPack 6), with no service to reach:
a Jetson in the field verifies offline. Sigstore's keyless flow needs an identity provider and a transparency
log online at signing and (for full checks) verification time, which a factory floor does not have.

What is signed: the manifest's digest (:func:`manifest_digest`), a SHA-256 over the manifest's canonical JSON
without its ``bundle_id``. The manifest lists every other file's SHA-256 and size, so one signature covers the
model, labels, preprocessing and the golden set; from schema 4 the bundle id is the first 16 hex digits of that
same digest, so editing anything in the manifest (classes, metrics) changes the id and breaks the signature.

Files::

    signing key    PEM, PKCS#8, mode 0600 (encrypted when $EDGE_TL_SIGNING_PASSPHRASE is set)
    public key     one line: ``edge-tl-ed25519 <base64 of the 32 raw bytes> <comment>``  (``.pub``)
    signature.json in the bundle: algorithm, key id, the signed digest, the base64 signature

Trusted keys on a device: every ``*.pub`` in the folders of ``$EDGE_TL_TRUSTED_KEYS`` (``:``-separated), else
``/etc/edge-tl/trusted-keys`` (root-owned: who can write the deploy root cannot add a key). A device installs and
serves only bundles a trusted key signed; one that trusts no key yet refuses every bundle (it cannot tell a genuine
one from a re-hashed forgery) until its first key is trusted: ``edge-tl keys trust``, ``bootstrap.sh --trust-key``
or, where the login may write the trust folder, ``edge-tl deploy push --trust-key`` (trust on first deploy only).
Rotation: trust the new key beside the old, sign new builds with the new one, then remove the old ``.pub``. See
docs/signing.md.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_tl.core.errors import CheckFailed, EdgeTLError
from edge_tl.core.importer import require

SIGNATURE = "signature.json"
ALGORITHM = "ed25519"
PUBLIC_PREFIX = "edge-tl-ed25519"
TRUST_ENV = "EDGE_TL_TRUSTED_KEYS"
KEY_ENV = "EDGE_TL_SIGNING_KEY"
PASSPHRASE_ENV = "EDGE_TL_SIGNING_PASSPHRASE"
DEFAULT_TRUST_DIR = Path("/etc/edge-tl/trusted-keys")
_CONTEXT = b"edge-tl bundle manifest v1\0"  # domain separation: this key signs nothing else by accident


def default_key_path() -> Path:
    """The workstation's signing key when none is named: $EDGE_TL_SIGNING_KEY, else
    ~/.config/edge-tl/signing/edge-tl.key (made by ``edge-tl keys generate``)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "edge-tl" / "signing" / "edge-tl.key"


def manifest_digest(data: dict[str, Any]) -> str:
    """SHA-256 (hex) of the manifest's canonical JSON (sorted keys, no spaces, UTF-8) without ``bundle_id``."""
    body = {k: v for k, v in data.items() if k != "bundle_id"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _crypto() -> Any:
    return require("cryptography.hazmat.primitives.asymmetric.ed25519", "signing and verifying bundles")


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_line(public_key: Any, comment: str = "") -> str:
    raw = _raw_public(public_key)
    return f"{PUBLIC_PREFIX} {base64.b64encode(raw).decode()} {comment or key_id(raw)}".rstrip() + "\n"


def generate_key(path: str | Path, comment: str = "") -> tuple[Path, Path, str]:
    """Write a new Ed25519 key to ``path`` (0600, never over an existing file) and its public key to
    ``path.pub``. Returns (key, pub, key id)."""
    ed = _crypto()
    from cryptography.hazmat.primitives import serialization

    path = Path(path).expanduser()
    pub = path.with_name(path.name + ".pub") if path.suffix != ".key" else path.with_suffix(".pub")
    for p in (path, pub):
        if p.exists():
            raise EdgeTLError(f"{p} already exists; edge-tl never overwrites a key",
                              "choose another --out, or remove the old key yourself after rotating to a new one")
    key = ed.Ed25519PrivateKey.generate()
    passphrase = os.environ.get(PASSPHRASE_ENV)
    enc = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
           else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_text(public_line(key.public_key(), comment))
    return path, pub, key_id(_raw_public(key.public_key()))


def load_private_key(path: str | Path) -> Any:
    _crypto()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EdgeTLError(f"cannot read the signing key {path} ({exc.strerror or exc})",
                          "edge-tl keys generate (or pass --sign-key PATH)") from exc
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except (ValueError, TypeError) as exc:
        raise EdgeTLError(f"{path} is not a usable signing key ({str(exc).splitlines()[0]})",
                          f"check ${PASSPHRASE_ENV} for an encrypted key, or make one: edge-tl keys generate") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgeTLError(f"{path} is not an Ed25519 key", "make one with edge-tl keys generate")
    return key


def load_public_key(path: str | Path) -> tuple[str, Any]:
    """(key id, key) from a ``.pub`` line; EdgeTLError naming the file when it is not one."""
    kid, key, _ = read_public_file(path)
    return kid, key


def read_public_file(path: str | Path, where: str | None = None) -> tuple[str, Any, str]:
    """(key id, key, the normalised line) of the ``.pub`` file ``path``; EdgeTLError naming ``where`` (default: the
    path) when it cannot be read or is not one."""
    path = Path(path)
    where = where or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeTLError(f"{where} is not an edge-tl public key ({getattr(exc, 'strerror', None) or exc})",
                          "use the .pub file that edge-tl keys generate wrote") from exc
    return parse_public_line(text, where)


def parse_public_line(text: str, where: str) -> tuple[str, Any, str]:
    """(key id, key, the normalised line) of one ``.pub`` line; EdgeTLError naming ``where`` when it is not one."""
    ed = _crypto()
    try:
        parts = text.split()
        if len(parts) < 2 or parts[0] != PUBLIC_PREFIX:
            raise ValueError(f"not an {PUBLIC_PREFIX} line")
        raw = base64.b64decode(parts[1], validate=True)
        key = ed.Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error) as exc:
        raise EdgeTLError(f"{where} is not an edge-tl public key ({exc})",
                          "use the .pub file that edge-tl keys generate wrote") from exc
    comment = " ".join(parts[2:])
    if not comment.isprintable():
        raise EdgeTLError(f"{where} is not an edge-tl public key (its comment holds control characters)",
                          "use the .pub file that edge-tl keys generate wrote")
    return key_id(raw), key, f"{PUBLIC_PREFIX} {parts[1]} {comment}".rstrip() + "\n"


def trust_dirs() -> list[Path]:
    env = os.environ.get(TRUST_ENV)
    if env is not None:
        return [Path(p).expanduser() for p in env.split(":") if p]
    return [DEFAULT_TRUST_DIR]


def trusted_keys(dirs: list[Path] | None = None) -> dict[str, Any]:
    """key id -> public key for every ``*.pub`` in the trust folders (a bad file is an error: never skipped)."""
    keys: dict[str, Any] = {}
    for d in dirs if dirs is not None else trust_dirs():
        if d.is_dir():
            for pub in sorted(d.glob("*.pub")):
                kid, key = load_public_key(pub)
                keys[kid] = key
    return keys


def trust_key(line: str, where: str, folder: Path | None = None, *, first_only: bool = False) -> dict[str, Any]:
    """Add the public key ``line`` (a ``.pub`` file's text, read from ``where``) to this machine's trusted keys, as
    ``<folder or the first trust folder>/<key id>.pub``. ``first_only``: only where no key is trusted yet (trust
    on first deploy: a deploy login may pin the first key, never add one beside keys its admin chose).
    Returns {"key_id", "path", "status": trusted | already-trusted}."""
    kid, _key, normal = parse_public_line(line, where)
    keys = trusted_keys()
    target_dir = folder or trust_dirs()[0]
    target = target_dir / f"{kid}.pub"
    if kid in keys or target.is_file():
        return {"key_id": kid, "path": str(target), "status": "already-trusted"}
    if first_only and keys:
        raise CheckFailed(f"this device already trusts key(s) {', '.join(sorted(keys))}, not {kid}; --trust-key pins "
                          "a key only on a device that trusts none yet (its first deploy)",
                          f"have the device's admin add it: sudo edge-tl keys trust {kid}.pub (on the device)")
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(normal, encoding="utf-8")
        os.chmod(tmp, 0o644)
        tmp.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise EdgeTLError(f"cannot write {target} ({exc.strerror or exc})",
                          "trust it as root on the device: sudo edge-tl keys trust KEY.pub (or bootstrap.sh "
                          f"--trust-key KEY.pub), or point ${TRUST_ENV} at a folder this user owns") from exc
    return {"key_id": kid, "path": str(target), "status": "trusted"}


def sign_folder(root: Path, digest: str, key: Any) -> dict[str, Any]:
    """Write ``root/signature.json`` signing ``digest`` (the manifest's) with ``key``."""
    raw = _raw_public(key.public_key())
    sig = key.sign(_CONTEXT + digest.encode())
    record = {"algorithm": ALGORITHM, "key_id": key_id(raw), "manifest_sha256": digest,
              "signature": base64.b64encode(sig).decode()}
    tmp = root / (SIGNATURE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    tmp.replace(root / SIGNATURE)
    return record


@dataclass
class SignatureStatus:
    state: str  # verified | unsigned | untrusted | invalid | unchecked (no trusted keys on this machine)
    key_id: str | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_signature(root: Path, digest: str, keys: dict[str, Any]) -> SignatureStatus:
    """The signature of a bundle folder whose manifest digest is ``digest``, against ``keys``."""
    path = Path(root) / SIGNATURE
    if not path.is_file():
        if not keys:
            return SignatureStatus("unchecked", None, "the bundle is unsigned and no trusted keys are configured here")
        return SignatureStatus("unsigned", None, "the bundle has no signature.json")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        kid, sig = str(record["key_id"]), base64.b64decode(record["signature"], validate=True)
        if record.get("algorithm") != ALGORITHM:
            return SignatureStatus("invalid", kid, f"unknown algorithm {record.get('algorithm')!r}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        return SignatureStatus("invalid", None, f"signature.json is unreadable ({type(exc).__name__})")
    if record.get("manifest_sha256") != digest:
        return SignatureStatus("invalid", kid, "the signature is for another manifest (the manifest was edited)")
    if not keys:
        return SignatureStatus("unchecked", kid, "no trusted keys are configured here")
    if kid not in keys:
        return SignatureStatus("untrusted", kid, f"signed by key {kid}, which is not among the trusted keys")
    from cryptography.exceptions import InvalidSignature

    try:
        keys[kid].verify(sig, _CONTEXT + digest.encode())
    except InvalidSignature:
        return SignatureStatus("invalid", kid, "the signature does not verify (the bundle was tampered with)")
    return SignatureStatus("verified", kid, f"signed by trusted key {kid}")


def enforce(status: SignatureStatus, allow_unsigned: bool, where: str) -> str | None:
    """Refuse what a device must not install or load; return a warning line for what it may, else None.

    * verified: fine;
    * invalid (a signature that does not verify or belongs to another manifest): always refused;
    * unsigned, signed by an untrusted key, or unchecked (this machine trusts no key yet, so it cannot tell a
      genuine bundle from a re-hashed forgery): refused unless ``allow_unsigned`` (then a warning line, recorded).
    """
    if status.state == "verified":
        return None
    if status.state == "invalid":
        raise CheckFailed(f"{where}: the bundle's signature is invalid: {status.detail}",
                          "rebuild and re-sign the bundle; never install a bundle whose signature fails")
    if allow_unsigned:
        return f"{where}: signature NOT verified: {status.detail}; accepted anyway (--allow-unsigned)"
    dirs = ":".join(map(str, trust_dirs()))
    if status.state == "unchecked":
        fix = (f"trust the workstation's key here first (sudo edge-tl keys trust edge-tl.pub into {dirs}, "
               "bootstrap.sh --trust-key, or --trust-key on deploy push / fleet deploy), or pass --allow-unsigned")
        if status.key_id is None:
            fix = "build it with a signing key (edge-tl keys sign), then " + fix
        raise CheckFailed(f"{where}: {status.detail}; a device that trusts no key accepts no bundle", fix)
    raise CheckFailed(f"{where}: {status.detail}",
                      f"sign it with a trusted key (edge-tl keys sign), trust the signer's key ({dirs}: edge-tl keys "
                      "trust KEY.pub), or pass --allow-unsigned")
