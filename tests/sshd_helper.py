"""Real OpenSSH servers for tests: throw-away keys, a loopback port, no PAM, this user (shared by the deploy and
fleet tests).

``start_sshd(folder)`` writes a host key, an sshd_config and (unless given) a client key pair into ``folder``,
starts ``sshd -D`` on a free loopback port and returns an :class:`SshdServer` whose ``known_hosts`` file holds
exactly its host key (``[127.0.0.1]:port`` form, as OpenSSH and paramiko look it up). Where sshd cannot run
here it raises :class:`SshdUnavailable` with the reason; the fixtures turn that into a skip.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path


class SshdUnavailable(Exception):
    """sshd (or ssh-keygen) is missing or refuses to start here: the reason, for pytest.skip."""


@dataclass
class SshdServer:
    port: int
    user: str
    key: Path  # the client's private key (its .pub is in authorized_keys)
    known_hosts: Path  # holds this server's host key only
    host_pub: str  # "ssh-ed25519 AAAA..."
    proc: subprocess.Popen
    log: Path

    @property
    def to(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    @property
    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_pub}\n"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    """A new ed25519 key pair without passphrase at ``path`` (+ ``.pub``)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def _forwarded_env(extra: dict[str, str] | None = None) -> str:
    """``SetEnv PYTHONPATH=...`` where the tests run with one (a source tree beside the installed package): the
    device half in an SSH session then runs the same code as the test; and the session's trust store
    (tests/conftest.py), so the device trusts the key the tests sign with. ``extra``: more variables for the device
    side (e.g. EDGE_TL_TRUSTED_KEYS, the device's trust store)."""
    base = {k: os.environ.get(k) for k in ("PYTHONPATH", "EDGE_TL_TRUSTED_KEYS")}  # the session's trust store
    env = {k: v for k, v in {**base, **(extra or {})}.items()
           if v and '"' not in v and "\n" not in v}
    return ("SetEnv " + " ".join(f'{k}="{v}"' for k, v in env.items()) + "\n") if env else ""


def start_sshd(d: Path, *, client_key: Path | None = None, env: dict[str, str] | None = None) -> SshdServer:
    """Start one sshd with its files in ``d`` (created); ``client_key`` shares a client key between servers;
    ``env``: variables every session on it gets (sshd_config SetEnv)."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(binary).is_file() or not shutil.which("ssh-keygen"):
        raise SshdUnavailable("OpenSSH's sshd/ssh-keygen are not installed "
                              "(apt-get install openssh-server openssh-client)")
    d.mkdir(parents=True, exist_ok=True)
    keygen(d / "host_key")
    if client_key is None:
        client_key = keygen(d / "client_key")
    shutil.copy(client_key.with_name(client_key.name + ".pub"), d / "authorized_keys")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    port = free_port()
    (d / "sshd_config").write_text(textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {d / 'host_key'}
        PidFile {d / 'sshd.pid'}
        AuthorizedKeysFile {d / 'authorized_keys'}
        StrictModes no
        UsePAM no
        PubkeyAuthentication yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        PermitRootLogin prohibit-password
        Subsystem sftp internal-sftp
        MaxStartups 20
        LogLevel VERBOSE
    """) + _forwarded_env(env))
    check = subprocess.run([binary, "-t", "-f", str(d / "sshd_config")], capture_output=True, text=True)
    if check.returncode != 0:
        raise SshdUnavailable(f"sshd refuses its test config: {check.stderr.strip()[-300:]}")
    log = d / "sshd.log"
    with open(log, "wb") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                                stderr=log_file)
    if not wait_port("127.0.0.1", port, 10) or proc.poll() is not None:
        proc.kill()
        proc.wait(timeout=10)
        raise SshdUnavailable(f"sshd did not start: {log.read_text()[-300:]}")
    host_pub = " ".join((d / "host_key.pub").read_text().split()[:2])
    known = d / "known_hosts"
    server = SshdServer(port, getpass.getuser(), client_key, known, host_pub, proc, log)
    known.write_text(server.known_hosts_line)
    return server
