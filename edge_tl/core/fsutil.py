"""Small file-system helpers: hashing, atomic writes and directories, safe tar extraction.

Files and folders made here follow the process umask (0644 / 0755 under the usual 022), although they are
born through ``mkstemp``/``mkdtemp`` (which create them 0600 / 0700): a bundle written by one user must be
readable by the service user on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from edge_tl.core.errors import EdgeTLError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask (read from /proc on Linux, else by setting and restoring it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_default(path: str | Path, *, directory: bool | None = None) -> None:
    """Give ``path`` the mode a plain ``open()``/``mkdir()`` would have: 0666/0777 less the umask."""
    path = Path(path)
    is_dir = path.is_dir() if directory is None else directory
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def chmod_tree(root: str | Path) -> None:
    """:func:`chmod_default` for ``root`` and everything under it (links are left alone)."""
    root = Path(root)
    chmod_default(root, directory=True)
    for path in root.rglob("*"):
        if not path.is_symlink():
            chmod_default(path)


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (created empty with the mode the umask gives, name ending in
    ``suffix`` for writers that look at it); rename it over ``path`` only if the block succeeds. On any exception
    (Ctrl-C included) the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        chmod_default(tmp, directory=False)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; rename it to ``final`` only if the block succeeds.

    On any exception (Ctrl-C included) the temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise EdgeTLError(f"{final} already exists", "choose another output folder or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        chmod_default(tmp, directory=True)
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def lock_holder(path: str | Path) -> str:
    """Who holds the lock file ``path`` (what :func:`file_lock` wrote there), in words."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
        return f"{info.get('what', 'edge-tl')} by pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
    except (OSError, ValueError, AttributeError):
        return "holder unknown"


@contextlib.contextmanager
def file_lock(path: str | Path, what: str, *, timeout: float = 0.0, busy: Callable[[str], Exception],
              waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing, never deleted: removing a lock file under a waiter
    splits the lock) for the block; wait up to ``timeout`` s, then raise ``busy(holder)``. The holder's pid,
    host, ``what`` and time are written into the file for the next one to name. The kernel releases the lock
    when the process dies, so a killed holder never leaves it stuck."""
    import fcntl
    import socket
    import time

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, timeout)
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy(lock_holder(path)) from None
                if waiting is not None and not said:
                    waiting(lock_holder(path))
                said = True
                time.sleep(0.1)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": stamp}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def make_tarball(src_dir: str | Path, dest: str | Path) -> Path:
    """Write ``src_dir`` as a .tar.gz whose single top-level folder is ``src_dir``'s name; atomic."""
    src_dir, dest = Path(src_dir), Path(dest)
    with atomic_file(dest) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(src_dir.rglob("*")):
            arc = PurePosixPath(dest.name.removesuffix(".tar.gz"), path.relative_to(src_dir).as_posix())
            tar.add(path, arcname=str(arc), recursive=False)
    return dest


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse absolute paths, ``..``, links and device files (the deploy issue's unpacking rules)."""
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (parts and parts[0].endswith(":")) or "\\" in name:
        raise EdgeTLError(f"archive entry '{name}' has an absolute path", "rebuild the bundle with edge-tl build")
    if ".." in parts:
        raise EdgeTLError(f"archive entry '{name}' escapes the bundle with '..'", "rebuild the bundle")
    if member.issym() or member.islnk():
        raise EdgeTLError(f"archive entry '{name}' is a link", "bundles hold regular files only; rebuild it")
    if not (member.isfile() or member.isdir()):
        raise EdgeTLError(f"archive entry '{name}' is a device or special file", "rebuild the bundle")


# what a broken or truncated archive raises while it is read (gzip: EOFError, zlib.error; tar: TarError)
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def _member_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    """The entry's path parts without '.' (``tar -C dir -czf x.tgz .`` writes ``./a/b``)."""
    return tuple(p for p in PurePosixPath(member.name).parts if p != ".")


def _bundle_top(archive: Path, members: list[tarfile.TarInfo], fix: str) -> tuple[str, ...]:
    """Check every member and the archive's shape; the bundle folder's parts inside it (``()``: at its top)."""
    for m in members:
        check_member(m)
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    for m in members:
        parts = _member_parts(m)
        if not parts:
            continue
        dirs.update(parts[:i] for i in range(1, len(parts)))
        if m.isdir():
            dirs.add(parts)
        elif parts in files:
            raise EdgeTLError(f"{archive} holds '{'/'.join(parts)}' twice", fix)
        else:
            files.add(parts)
    clash = sorted(files & dirs)
    if clash:
        raise EdgeTLError(f"{archive} holds '{'/'.join(clash[0])}' both as a file and as a folder", fix)
    if not files:
        raise EdgeTLError(f"{archive} holds no files", fix)
    tops = {parts[0] for parts in files | dirs}
    if ("manifest.json",) in files:
        return ()
    if len(tops) == 1 and tops <= {d[0] for d in dirs}:
        return (tops.pop(),)
    raise EdgeTLError(f"{archive} must hold one top-level folder, found {sorted(tops)[:5]}", fix)


#: the most an archive may unpack to (its members' sizes summed, sparse members at their full size), and the most
#: members it may hold: checked before anything is written (issue 24: a sparse 2 GiB member wrote 2.15 GB before
#: it was refused). A 224-px EfficientNet-Lite0 bundle is about 30 MB. $EDGE_TL_MAX_UNPACKED_BYTES overrides.
MAX_UNPACKED_BYTES = 2 << 30
MAX_MEMBERS = 10_000


def _unpack_limit() -> int:
    try:
        return int(os.environ.get("EDGE_TL_MAX_UNPACKED_BYTES", MAX_UNPACKED_BYTES))
    except ValueError:
        return MAX_UNPACKED_BYTES


def _check_sizes(archive: Path, members: list[tarfile.TarInfo], dest: Path, fix: str) -> None:
    files = [m for m in members if m.isfile()]
    total, limit = sum(max(m.size, 0) for m in files), _unpack_limit()
    if len(members) > MAX_MEMBERS:
        raise EdgeTLError(f"{archive} holds {len(members)} entries, more than a bundle's {MAX_MEMBERS}", fix)
    if total > limit:
        raise EdgeTLError(f"{archive} would unpack to {total / 2**20:.0f} MiB, more than the {limit / 2**20:.0f} MiB "
                          "a bundle may take (nothing was written)",
                          f"{fix} (or raise $EDGE_TL_MAX_UNPACKED_BYTES for a bundle this large)")
    probe = dest if dest.exists() else next((p for p in dest.parents if p.exists()), None)
    if probe is not None:
        free = shutil.disk_usage(probe).free
        if total > free:
            raise EdgeTLError(f"unpacking {archive} needs {total / 2**20:.0f} MiB and {probe} has "
                              f"{free / 2**20:.0f} MiB free (nothing was written)", "free disk space")


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a .tar.gz after checking every member; returns the bundle folder inside ``dest``.

    The archive holds one top-level folder (what ``edge-tl build`` writes), or the bundle's files at its top
    (``tar -C bundle -czf x.tgz .``; then ``dest`` itself is returned). A truncated or corrupt archive, duplicate
    entries, or a file and a folder of the same name are refused with one line (EdgeTLError).
    """
    archive, dest = Path(archive), Path(dest)
    fix = "re-copy the archive, or rebuild the bundle with edge-tl build"
    try:
        tar = tarfile.open(archive, "r:*")
    except _ARCHIVE_ERRORS as exc:
        raise EdgeTLError(f"{archive} is not a readable .tar.gz ({exc or type(exc).__name__})", fix) from exc
    try:
        with tar:
            members = tar.getmembers()
            root = dest.joinpath(*_bundle_top(archive, members, fix))
            _check_sizes(archive, members, dest, fix)
            dest.mkdir(parents=True, exist_ok=True)
            written, limit = 0, _unpack_limit()
            for m in members:
                parts = _member_parts(m)
                if not parts:
                    continue
                target = dest.joinpath(*parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    raise EdgeTLError(f"archive entry '{m.name}' has no data", "rebuild the bundle")
                with src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):  # a header that lied about its size stops here too
                        written += len(chunk)
                        if written > limit:
                            raise EdgeTLError(f"{archive} unpacks to more than the {limit / 2**20:.0f} MiB a "
                                              "bundle may take", fix)
                        out.write(chunk)
            # read the stream to its end: gzip checks its CRC and length only there, so an archive cut in its
            # trailer (every member whole) is refused too; what follows the tar's end counts against the limit
            while chunk := tar.fileobj.read(1 << 20):  # type: ignore[union-attr]
                written += len(chunk)
                if written > limit:
                    raise EdgeTLError(f"{archive} unpacks to more than the {limit / 2**20:.0f} MiB a bundle may "
                                      "take", fix)
            return root
    except EdgeTLError:
        raise
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise EdgeTLError(f"{archive} is truncated or corrupt ({why})", fix) from exc
    except OSError as exc:
        raise EdgeTLError(f"cannot unpack {archive} into {dest} ({exc})",
                          "free disk space or check the folder's permissions") from exc
