"""`edge-tl fleet`: `edge-tl deploy` on many devices, through Ansible.

The work on each host is the device half of `edge-tl deploy` (``edge-tl deploy device status|prepare|install|
rollback``: verify, engine build, parity gate, atomic switch, health check, automatic switch back), run by the
Ansible role ``deploy/ansible/roles/edge_tl_deploy``; this package only prepares and runs it and reports:

- :mod:`edge_tl.workstation.fleet.inventory`: read and check an Ansible inventory (through ``ansible-inventory``);
- :mod:`edge_tl.workstation.fleet.runner`: run ``deploy/ansible/fleet.yml`` with ansible-runner (canary batches through
  ``serial``, ``max_fail_percentage``; host keys checked by OpenSSH against known_hosts);
- :mod:`edge_tl.workstation.fleet.report`: the per-host rows (version before/after, gate, engine build time,
  health), the table and the JSON report.

Needs the ``fleet`` extra (ansible-core, ansible-runner) on the workstation only; nothing is imported at import
time.
"""
