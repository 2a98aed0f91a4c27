"""Small file-system helpers: hashing, atomic writes and directories, safe tar extraction."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from edge_tl.core.errors import EdgeTLError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (created empty, name ending in ``suffix`` for writers that
    look at it); rename it over ``path`` only if the block succeeds. On any exception (Ctrl-C included) the
    temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
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


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a .tar.gz after checking every member; returns the single top-level directory."""
    archive, dest = Path(archive), Path(dest)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise EdgeTLError(f"{archive} is not a readable .tar.gz ({exc})", "re-copy or rebuild the bundle") from exc
    with tar:
        members = tar.getmembers()
        for m in members:
            check_member(m)
        tops = {PurePosixPath(m.name).parts[0] for m in members if m.name}
        if len(tops) != 1:
            raise EdgeTLError(f"{archive} must hold one top-level folder, found {sorted(tops)}", "rebuild it")
        dest.mkdir(parents=True, exist_ok=True)
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            if src is None:
                raise EdgeTLError(f"archive entry '{m.name}' has no data", "rebuild the bundle")
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
        return dest / tops.pop()
