"""`edge-tl deploy`: ship a bundle to a Jetson over SSH, verify it, build and gate it there, switch atomically.

- :mod:`edge_tl.deploy.transport` (workstation): paramiko SSH with known_hosts checking, rsync/SFTP resumable upload.
- :mod:`edge_tl.deploy.client` (workstation): packs the bundle, uploads it, drives the device half.
- :mod:`edge_tl.deploy.device` (device): lock, unpack, verify, engine, parity gate, switch, service health, rollback.
- :mod:`edge_tl.deploy.state`, :mod:`.gate`, :mod:`.service` (device): the pieces ``device`` is built from.

The device modules import neither torch nor paramiko; nothing here imports them at import time.
"""
