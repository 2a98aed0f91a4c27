"""The workstation half of ``edge-tl deploy``: pack and upload a bundle over SSH, drive the device half.

- :mod:`edge_tl.workstation.ship.transport`: paramiko SSH with known_hosts checking, rsync/SFTP resumable upload.
- :mod:`edge_tl.workstation.ship.client`: packs the bundle, uploads it, runs ``edge-tl deploy`` device commands.
"""
