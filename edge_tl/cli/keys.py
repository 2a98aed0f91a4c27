"""`edge-tl keys`: signing keys and the device's trust store (edge_tl.core.signing; docs/signing.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

out = Console(highlight=False, soft_wrap=True)

keys_app = typer.Typer(no_args_is_help=True, help="Sign bundles and manage the keys a device trusts.")


@keys_app.command("generate")
def generate_cmd(
    key: Path = typer.Option(None, "--out", help="Where the private key goes (default: $EDGE_TL_SIGNING_KEY, else "
                             "~/.config/edge-tl/signing/edge-tl.key); the public key goes beside it as .pub."),
    comment: str = typer.Option("", "--comment", help="A name for the key in the .pub line (e.g. ci@factory)."),
) -> None:
    """Make an Ed25519 signing key (never over an existing one). Encrypted when $EDGE_TL_SIGNING_PASSPHRASE is set."""
    from edge_tl.core.signing import default_key_path, generate_key

    path, pub, kid = generate_key(key or default_key_path(), comment)
    out.print(escape(f"key {kid}: private {path} (keep it secret), public {pub} (put it on the devices: "
                     f"edge-tl keys trust {pub.name})"))


@keys_app.command("trust")
def trust_cmd(
    pub: Path = typer.Argument(..., help="A .pub file written by edge-tl keys generate."),
    folder: Path = typer.Option(None, "--dir", help="The trust folder (default: the first of $EDGE_TL_TRUSTED_KEYS, "
                                "else /etc/edge-tl/trusted-keys)."),
) -> None:
    """Add a public key to this machine's trusted keys (run it on the device, as root for /etc)."""
    from edge_tl.core.signing import read_public_file, trust_key

    res = trust_key(read_public_file(pub)[2], str(pub), folder)
    if res["status"] == "already-trusted":
        out.print(escape(f"key {res['key_id']} is already trusted ({res['path']})"))
        return
    out.print(escape(f"trusted key {res['key_id']} ({res['path']}); remove that file to stop trusting it"))


@keys_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The trusted keys of this machine and where they are read from."""
    from edge_tl.core.signing import trust_dirs, trusted_keys

    dirs = trust_dirs()
    ids = sorted(trusted_keys(dirs))
    if as_json:
        print(json.dumps({"dirs": [str(d) for d in dirs], "keys": ids}, indent=2))
        return
    shown = ", ".join(ids) or "none (every bundle is refused here until one is trusted, or --allow-unsigned)"
    out.print(escape(f"trusted keys from {':'.join(map(str, dirs))}: {shown}"))


@keys_app.command("sign")
def sign_cmd(
    bundle: Path = typer.Argument(..., help="A bundle folder (edge-tl build's run/bundle); its .tar.gz beside it is "
                                  "rewritten."),
    key: Path = typer.Option(None, "--key", help="The private key (default: $EDGE_TL_SIGNING_KEY, else "
                             "~/.config/edge-tl/signing/edge-tl.key)."),
) -> None:
    """Sign (or re-sign) a built bundle folder after verifying it."""
    from edge_tl.core.bundle import Bundle
    from edge_tl.core.errors import EdgeTLError
    from edge_tl.core.fsutil import make_tarball
    from edge_tl.core.signing import default_key_path, load_private_key, sign_folder

    if not bundle.is_dir():
        raise EdgeTLError(f"{bundle} is not a bundle folder", "sign the folder edge-tl build wrote (run/bundle)")
    b = Bundle.open(bundle)
    if b.manifest.schema_version < 4:
        raise EdgeTLError(f"{bundle} is a schema {b.manifest.schema_version} bundle, whose manifest is not covered "
                          "by its id", "rebuild it with this edge-tl, then sign it")
    record = sign_folder(bundle, b.digest, load_private_key(key or default_key_path()))
    tarball = bundle.with_name(bundle.name + ".tar.gz")
    if tarball.is_file():
        make_tarball(bundle, tarball)
    out.print(escape(f"signed {b.manifest.name} ({b.manifest.bundle_id}) with key {record['key_id']}"
                     + (f"; {tarball.name} rewritten" if tarball.is_file() else "")))


@keys_app.command("verify")
def verify_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder or .tar.gz."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Exit 0 for an unsigned or untrusted bundle."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check a bundle's hashes and its signature against this machine's trusted keys (what deploy checks)."""
    from edge_tl.core.bundle import Bundle
    from edge_tl.core.signing import enforce

    b = Bundle.open(bundle)
    status = b.signature()
    warning = enforce(status, allow_unsigned, f"bundle {b.manifest.name} ({b.manifest.bundle_id})")
    if as_json:
        print(json.dumps({"bundle_id": b.manifest.bundle_id, **status.as_dict(), "warning": warning}, indent=2))
        return
    if warning:
        out.print("[yellow]WARNING[/] " + escape(warning))
    else:
        out.print("[green]verified[/] " + escape(f"{b.manifest.name} ({b.manifest.bundle_id}): {status.detail}"))


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
