"""SSH to the device from the workstation: paramiko for commands and SFTP, rsync over OpenSSH where both ends have it.

Host keys are checked against a known_hosts file (``~/.ssh/known_hosts`` by default); an unknown host is refused
unless ``accept_new_host_key`` is set, and a changed key is always refused. Transfers resume: rsync with
``--partial --append-verify``; SFTP by comparing the remote file's size and the sha256 of what it holds with
the same prefix of the local file. Paths of keys appear in messages; key material and passwords never do.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import re
import select
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import require

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
CHUNK = 64 * 1024
Progress = Callable[[int, int], None]  # (bytes on the device, total)
Notify = Callable[[str], None]


@dataclass(frozen=True)
class SSHTarget:
    user: str
    host: str
    port: int = 22

    @classmethod
    def parse(cls, text: str) -> SSHTarget:
        """``user@host[:port]``, ``host``, ``user@[v6addr]:port``."""
        m = re.fullmatch(r"(?:([^@\s]+)@)?(\[[0-9A-Fa-f:.]+\]|[^@:\s\[\]]+)(?::(\d{1,5}))?", text or "")
        if not m or (m.group(3) and not 0 < int(m.group(3)) < 65536):
            raise EdgeTLError(f"'{text}' is not an SSH target", "write it as user@host or user@host:port")
        return cls(m.group(1) or getpass.getuser(), m.group(2).strip("[]"), int(m.group(3) or 22))

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")


def _quiet_paramiko() -> None:
    """paramiko logs a failed handshake with a traceback from its transport thread; our one-line error says it
    all. (``--debug`` turns logging back on.)"""
    import logging

    logger = logging.getLogger("paramiko")
    if not logger.handlers and os.environ.get("EDGE_TL_DEBUG") != "1":
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def fingerprint(key) -> str:  # type: ignore[no-untyped-def]
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


def _sha256_prefix(path: Path, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left > 0 and (block := f.read(min(CHUNK * 16, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


@dataclass
class RunResult:
    rc: int
    stdout: str
    stderr: str


@dataclass
class UploadResult:
    method: str
    resumed_from: int
    size: int


class SSHSession:
    """One SSH connection to the device (a context manager)."""

    def __init__(self, target: SSHTarget, *, identity: Path | None = None, known_hosts: Path | None = None,
                 accept_new_host_key: bool = False, connect_timeout: float = 15.0, notify: Notify | None = None):
        self.target = target
        self.identity = Path(identity).expanduser() if identity else None
        self.known_hosts = Path(known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
        self.accept_new = accept_new_host_key
        self.timeout = connect_timeout
        self.notify = notify or (lambda _msg: None)
        self._client = None

    # -- connecting ---------------------------------------------------------------------------------------------
    def _policy(self):  # type: ignore[no-untyped-def]
        paramiko = require("paramiko", "edge-tl deploy")
        session = self

        class Policy(paramiko.MissingHostKeyPolicy):
            def missing_host_key(self, client, hostname, key):  # type: ignore[no-untyped-def]
                known = client.get_host_keys().lookup(hostname)
                if known:  # known under another key type: as suspicious as a changed key
                    raise EdgeTLError(f"{hostname} offered a {key.get_name()} host key, but {session.known_hosts} "
                                      f"holds a {', '.join(known.keys())} key for it",
                                      f"if the device was re-flashed: ssh-keygen -R '{hostname}', then re-run")
                if not session.accept_new:
                    raise EdgeTLError(f"{hostname}'s host key ({fingerprint(key)}) is not in {session.known_hosts}",
                                      "compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the "
                                      "device, then re-run with --accept-new-host-key")
                session.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(session.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
                client.get_host_keys().add(hostname, key.get_name(), key)
                session.notify(f"accepted the new host key of {hostname} ({fingerprint(key)}) into "
                               f"{session.known_hosts}")

        return Policy()

    def connect(self) -> SSHSession:
        paramiko = require("paramiko", "edge-tl deploy")
        client = paramiko.SSHClient()
        if self.known_hosts.is_file():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(self._policy())
        kwargs: dict = {"username": self.target.user, "port": self.target.port, "timeout": self.timeout,
                        "banner_timeout": self.timeout, "auth_timeout": self.timeout}
        if self.identity is not None:
            if not self.identity.is_file():
                raise EdgeTLError(f"identity file {self.identity} does not exist", "give the private key's path")
            kwargs.update(key_filename=str(self.identity), look_for_keys=False, allow_agent=False)
        t = self.target
        _quiet_paramiko()
        kwargs["sock"] = self._open_socket()
        try:
            client.connect(t.host, **kwargs)
        except paramiko.BadHostKeyException as exc:
            raise EdgeTLError(f"{t.known_hosts_name}'s host key changed ({fingerprint(exc.key)} is not the "
                              f"{fingerprint(exc.expected_key)} in {self.known_hosts}): refusing to connect",
                              f"if the device was re-flashed: ssh-keygen -f {self.known_hosts} -R "
                              f"'{t.known_hosts_name}', then re-run") from None
        except paramiko.PasswordRequiredException:
            raise EdgeTLError(f"the key {self.identity} is protected by a passphrase",
                              f"load it into ssh-agent (ssh-add {self.identity}) and leave out --identity") from None
        except paramiko.AuthenticationException:
            raise EdgeTLError(f"{t} did not accept our SSH key" + (f" ({self.identity})" if self.identity else ""),
                              "pass --identity KEY for a key in the device's ~/.ssh/authorized_keys") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            if isinstance(exc, EdgeTLError):
                raise
            raise EdgeTLError(f"cannot connect to {t}: {exc}", "check the address, the port and that sshd runs "
                                                                "on the device") from None
        except BaseException:
            client.close()
            raise
        self._client = client
        return self

    def _open_socket(self):  # type: ignore[no-untyped-def]
        """A TCP connection to the target on which an SSH server has sent its banner (``SSH-``), all within the
        connect timeout; a port that does not speak SSH fails here with one line, before paramiko starts."""
        import socket
        import time

        t = self.target
        where = f"{t.host}:{t.port}" if ":" not in t.host else f"[{t.host}]:{t.port}"
        try:
            sock = socket.create_connection((t.host, t.port), timeout=self.timeout)
        except socket.gaierror as exc:
            raise EdgeTLError(f"cannot resolve the device address {t.host} ({exc.strerror or exc})",
                              "check the host name or use the device's IP address") from None
        except OSError as exc:
            raise EdgeTLError(f"no SSH server answered on {where} ({exc.strerror or exc})",
                              "check the address, the port and that sshd runs on the device") from None
        deadline = time.monotonic() + self.timeout
        seen = b""
        try:
            while not seen.startswith(b"SSH-") and b"\n" not in seen and len(seen) < 8192:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                try:
                    data = sock.recv(8192, socket.MSG_PEEK)  # peek: paramiko reads the banner itself
                except OSError:  # timed out or reset
                    break
                if not data:  # closed without a word
                    break
                if data == seen:
                    time.sleep(0.05)
                seen = data
            if not seen.startswith(b"SSH-"):
                raise EdgeTLError(f"no SSH server answered on {where} (within {self.timeout:g} s)",
                                  "check the port (sshd listens on 22 by default) and that sshd runs on the device")
            sock.settimeout(self.timeout)
            return sock
        except BaseException:
            sock.close()
            raise

    def __enter__(self) -> SSHSession:
        return self.connect() if self._client is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def client(self):  # type: ignore[no-untyped-def]
        if self._client is None:
            self.connect()
        return self._client

    def _lost(self, what: str, exc: object = None, fix: str | None = None) -> EdgeTLError:
        why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        # the SFTP server's own refusals (no space, no permission) come as OSError with an errno
        if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, ConnectionError):
            return EdgeTLError(f"{what} on {self.target} failed{why}", "check the device's free space and the "
                                                                       "permissions of --root")
        return EdgeTLError(f"the connection to {self.target} dropped during {what}{why}",
                           fix or "re-run the same command: nothing was switched, and the upload resumes")

    # -- commands ---------------------------------------------------------------------------------------------
    def run(self, argv: list[str], *, on_stderr: Notify | None = None) -> RunResult:
        """Run ``argv`` on the device (quoted for its shell); stderr lines go to ``on_stderr`` as they come."""
        command = shlex.join(argv)
        try:
            chan = self.client.get_transport().open_session()
            chan.exec_command(command)
        except (OSError, EOFError, require("paramiko").SSHException) as exc:
            raise self._lost(f"`{argv[0]}`", exc) from None
        out, err, pending = bytearray(), bytearray(), bytearray()

        def drain_stderr() -> None:
            while chan.recv_stderr_ready():
                data = chan.recv_stderr(CHUNK)
                err.extend(data)
                pending.extend(data)
            while b"\n" in pending:
                line, _, rest = bytes(pending).partition(b"\n")
                pending[:] = rest
                if on_stderr:
                    on_stderr(line.decode("utf-8", "replace"))

        while True:
            select.select([chan], [], [], 0.5)
            while chan.recv_ready():
                out.extend(chan.recv(CHUNK))
            drain_stderr()
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if chan.closed and not chan.exit_status_ready():
                break
        rc = chan.recv_exit_status() if chan.exit_status_ready() else -1
        chan.close()
        if pending and on_stderr:
            on_stderr(pending.decode("utf-8", "replace"))
        if rc == -1:
            raise self._lost(f"`{shlex.join(argv[:4])} ...`", fix="the device finishes (or undoes) that step on its "
                             "own; see edge-tl deploy status, then re-run if needed")
        return RunResult(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def has_remote(self, program: str) -> bool:
        return self.run(["sh", "-c", f"command -v {shlex.quote(program)} >/dev/null"]).rc == 0

    # -- transfers --------------------------------------------------------------------------------------------
    def upload(self, local: Path, remote: str, *, method: str = "auto", progress: Progress | None = None,
               remote_sha256: Callable[[str], str | None] | None = None) -> UploadResult:
        """Copy ``local`` to ``remote`` (the parent folder must exist), resuming what an earlier try left."""
        if method not in ("auto", "rsync", "sftp"):
            raise EdgeTLError(f"unknown transfer method '{method}'", "choose auto, rsync or sftp")
        if method != "sftp":
            local_ok = shutil.which("rsync") and shutil.which("ssh")
            if local_ok and self.has_remote("rsync"):
                try:
                    return self._rsync(local, remote)
                except EdgeTLError as exc:
                    if method == "rsync":
                        raise
                    self.notify(f"rsync failed ({exc.problem}); continuing over SFTP")
            elif method == "rsync":
                raise EdgeTLError(f"rsync is missing {'here' if not local_ok else 'on ' + str(self.target)}",
                                  "install rsync on both ends, or use --transfer sftp")
        return self._sftp(local, remote, progress, remote_sha256)

    def _ssh_command(self) -> list[str]:
        cmd = ["ssh", "-p", str(self.target.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", f"ConnectTimeout={int(self.timeout)}"]
        if self.identity is not None:
            cmd += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return cmd

    def _rsync(self, local: Path, remote: str) -> UploadResult:
        host = f"[{self.target.host}]" if ":" in self.target.host else self.target.host
        argv = ["rsync", "--partial", "--append-verify", "--protect-args", "--chmod=F600",
                "-e", shlex.join(self._ssh_command()), str(local), f"{self.target.user}@{host}:{remote}"]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise EdgeTLError(f"rsync to {self.target} failed (exit {proc.returncode}): {last}",
                              "re-run the same command: the upload resumes")
        return UploadResult("rsync", -1, local.stat().st_size)

    def _sftp(self, local: Path, remote: str, progress: Progress | None,
              remote_sha256: Callable[[str], str | None] | None) -> UploadResult:
        size = local.stat().st_size
        offset = 0
        try:
            sftp = self.client.open_sftp()
        except (OSError, EOFError, require("paramiko").SSHException) as exc:
            raise self._lost("the upload", exc) from None
        sent = 0
        try:
            try:
                have = sftp.stat(remote).st_size or 0
            except FileNotFoundError:
                have = 0
            if 0 < have <= size and remote_sha256 is not None:
                if remote_sha256(remote) == _sha256_prefix(local, have):
                    offset = have
                else:
                    self.notify(f"the partial upload on the device does not match {local.name}; starting over")
            if offset == size:
                return UploadResult("sftp", offset, size)
            with sftp.open(remote, "r+" if offset else "w") as dst, open(local, "rb") as src:
                dst.set_pipelined(True)
                if offset:
                    dst.seek(offset)
                    src.seek(offset)
                    self.notify(f"resuming the upload at {offset} of {size} bytes")
                sent = offset
                while block := src.read(CHUNK):
                    dst.write(block)
                    sent += len(block)
                    if progress:
                        progress(sent, size)
        except (OSError, EOFError, require("paramiko").SSHException) as exc:
            raise self._lost(f"the upload (at about {sent} of {size} bytes)", exc) from None
        finally:
            try:
                sftp.close()
            except Exception:  # the connection may already be gone
                pass
        return UploadResult("sftp", offset, size)

