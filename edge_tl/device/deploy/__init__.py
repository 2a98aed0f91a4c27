"""`edge-tl deploy`: ship a bundle to a Jetson over SSH, verify it, build and gate it there, switch atomically.

- :mod:`edge_tl.workstation.ship.transport` (workstation): paramiko SSH, known_hosts checking, resumable upload.
- :mod:`edge_tl.workstation.ship.client` (workstation): packs the bundle, uploads it, drives the device half.
- :mod:`edge_tl.device.deploy.device` (device): lock, unpack, verify, engine, parity gate, switch, health, rollback.
- :mod:`edge_tl.device.deploy.state`, :mod:`.gate`, :mod:`.service` (device): the pieces ``device`` is built from.

The device modules import neither torch nor paramiko; nothing here imports them at import time.
"""
