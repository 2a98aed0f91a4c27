"""Read an Ansible inventory (YAML or INI, Ansible's own formats) and check what `edge-tl fleet` relies on.

Parsing is Ansible's: ``ansible-inventory --list`` with unparsed sources made fatal, so an inventory that does
not parse is refused before any host is touched, in one line. Checked per host: ``edge_tl_root`` (default
``/opt/edge-tl``) is an absolute path, ``ansible_port`` a port number.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.layout import system_dir

DEFAULT_ROOT = "/opt/edge-tl"
INVENTORY_FIX = ("fix it (Ansible's YAML or INI inventory format; see docs/fleet.md and "
                 "deploy/ansible/inventory.example.yml)")


@dataclass(frozen=True)
class FleetHost:
    name: str
    address: str  # ansible_host, else the name
    port: int | None
    user: str | None
    root: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ansible_tool(name: str) -> str:
    """An Ansible command (``ansible-playbook``...) from this interpreter's environment, else from PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise EdgeTLError(f"{name} is not installed (it comes with ansible-core)",
                          "pip install 'edge-tl[fleet]' on this workstation")
    return found


def _parse_failure(stderr: str, path: Path) -> str:
    """The one reason Ansible gives for not parsing ``path``: the plugin matching its suffix first."""
    reasons: dict[str, str] = {}
    for m in re.finditer(r"Failed to parse (?:inventory with '?(\w+)'? plugin|\S+ with (\w+) plugin):\s*(.+)", stderr):
        reasons.setdefault(m.group(1) or m.group(2), m.group(3).strip())
    origin = re.search(r"Origin: (\S+:\d+:\d+)", stderr)
    order = ("yaml", "auto", "ini") if path.suffix.lower() in (".yml", ".yaml") else ("ini", "yaml", "auto")
    reason = next((reasons[k] for k in order if k in reasons), None) or next(iter(reasons.values()), None)
    if reason is None:
        errors = [ln.split("]:", 1)[-1].strip() for ln in stderr.splitlines() if "ERROR" in ln]
        reason = errors[-1] if errors else (stderr.strip().splitlines() or ["no inventory was parsed"])[-1]
    return reason + (f" (at {origin.group(1)})" if origin and origin.group(1) not in reason else "")


def _hosts_of(data: dict[str, Any], group: str = "all", seen: set[str] | None = None) -> list[str]:
    seen = set() if seen is None else seen
    if group in seen:
        return []
    seen.add(group)
    entry = data.get(group) or {}
    hosts = list(entry.get("hosts") or [])
    for child in entry.get("children") or []:
        hosts += _hosts_of(data, child, seen)
    return list(dict.fromkeys(hosts))


def load_inventory(path: str | Path, limit: str | None = None) -> list[FleetHost]:
    """The hosts of ``path`` (after ``limit``, an Ansible host pattern), checked; raises EdgeTLError."""
    path = Path(path)
    if not path.exists():
        raise EdgeTLError(f"inventory {path} does not exist", "give the inventory file (YAML or INI) of your devices")
    env = {**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True", "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED":
           "True", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_DEPRECATION_WARNINGS": "False"}
    argv = [ansible_tool("ansible-inventory"), "-i", str(path), "--list", *(["--limit", limit] if limit else [])]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EdgeTLError(f"ansible-inventory could not run ({exc})", "check the ansible-core install") from None
    if proc.returncode != 0:
        raise EdgeTLError(f"inventory {path} does not parse: {_parse_failure(proc.stderr, path)}", INVENTORY_FIX)
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise EdgeTLError(f"ansible-inventory printed no inventory for {path}", INVENTORY_FIX) from None
    names = _hosts_of(data)
    if not names:
        where = f" matching --limit {limit}" if limit else ""
        raise EdgeTLError(f"inventory {path} has no hosts{where}", INVENTORY_FIX)
    hostvars = (data.get("_meta") or {}).get("hostvars") or {}
    hosts, problems = [], []
    for name in names:
        hv = hostvars.get(name) or {}
        root = hv.get("edge_tl_root", DEFAULT_ROOT)
        if not isinstance(root, str) or not (root.startswith("/") or "{{" in root):
            problems.append(f"{name}: edge_tl_root '{root}' is not an absolute path")
        elif "{{" not in root and system_dir(root):
            problems.append(f"{name}: edge_tl_root '{root}' is a system folder (deploy writes and deletes there)")
        port = hv.get("ansible_port", hv.get("ansible_ssh_port"))
        if port is not None:
            try:
                port = int(port)
                if not 0 < port < 65536:
                    raise ValueError
            except (TypeError, ValueError):
                if "{{" not in str(port):
                    problems.append(f"{name}: ansible_port '{port}' is not a port number")
                port = None
        user = hv.get("ansible_user", hv.get("ansible_ssh_user"))
        hosts.append(FleetHost(name, str(hv.get("ansible_host", name)), port, str(user) if user else None, str(root)))
    if problems:
        raise EdgeTLError(f"inventory {path}: {'; '.join(problems)}", INVENTORY_FIX)
    return hosts
