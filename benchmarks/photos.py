"""Real photographs, offline: the categorization images of GCompris (Debian package ``gcompris-qt-data``).

``prepare(folder)`` fetches the package with the system package client (``apt-get download``, no install, no root
needed for the download itself), takes ``usr/share/gcompris-qt/rcc/categorization.rcc`` out of it
(``dpkg-deb --fsys-tarfile``), reads that Qt resource file with :mod:`rcc` and writes one folder per class:

    fishes 28-29, monuments 27-28, renewable 29-30 (energy), tools 39-40, household 17 (GCompris's "others")

about 320x240 WebP photos, with each class's README (authors, sources, licences: public domain, CC0, CC-BY(-SA))
copied to ``ATTRIBUTION/<class>.txt`` beside the ``images/`` data root. An image Pillow cannot decode is
left in place: edge-tl's data loader names it and skips or refuses it as ``data.strict`` says.

    python benchmarks/photos.py /tmp/gcompris-photos     # prepare only
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rcc import RccFile  # noqa: E402

PACKAGE = "gcompris-qt-data"
MEMBER = "./usr/share/gcompris-qt/rcc/categorization.rcc"
PREFIX = "gcompris/src/activities/categorization/resource/images/"
CLASSES = {"fishes": "fishes", "monuments": "monuments", "renewable": "renewable", "tools": "tools",
           "others": "household"}
PHOTO_EXT = (".webp", ".jpg", ".jpeg", ".png")


def fetch_rcc(cache: Path) -> Path:
    """categorization.rcc from the package (downloaded once into ``cache``)."""
    cache.mkdir(parents=True, exist_ok=True)
    rcc = cache / "categorization.rcc"
    if rcc.is_file():
        return rcc
    debs = sorted(cache.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        if not shutil.which("apt-get"):
            raise SystemExit(f"apt-get is not here: download the Debian package {PACKAGE} into {cache} by hand")
        done = subprocess.run(["apt-get", "download", PACKAGE], cwd=cache, capture_output=True, text=True)
        debs = sorted(cache.glob(f"{PACKAGE}_*.deb"))
        if done.returncode != 0 or not debs:
            raise SystemExit(f"apt-get download {PACKAGE} failed: {done.stderr.strip().splitlines()[-1:]} "
                             "(run apt-get update, or put the .deb in the cache folder)")
    with tempfile.TemporaryDirectory() as tmp:
        tar_path = Path(tmp) / "data.tar"
        with open(tar_path, "wb") as out:
            subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], stdout=out, check=True)
        with tarfile.open(tar_path) as tar:
            member = tar.extractfile(MEMBER)
            if member is None:
                raise SystemExit(f"{debs[-1].name} has no {MEMBER}")
            tmp_rcc = rcc.with_suffix(".part")
            tmp_rcc.write_bytes(member.read())
            tmp_rcc.replace(rcc)
    return rcc


def prepare(folder: Path, cache: Path | None = None) -> dict[str, int]:
    """Class folders of photos under ``folder/images`` (made once); returns images per class."""
    folder = Path(folder)
    marker = folder / ".gcompris-photos"
    if not marker.is_file():
        rcc = RccFile.open(fetch_rcc(cache or folder.parent / f".{PACKAGE}-cache"))
        tmp = folder.with_name(folder.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        for path, blob in rcc.walk():
            if not path.startswith(PREFIX):
                continue
            sub, _, fname = path[len(PREFIX):].partition("/")
            if sub not in CLASSES or "/" in fname:
                continue
            if fname.lower().endswith(PHOTO_EXT):
                out = tmp / "images" / CLASSES[sub] / fname
            elif fname == "README":
                out = tmp / "ATTRIBUTION" / f"{CLASSES[sub]}.txt"
            else:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(blob)
        (tmp / ".gcompris-photos").write_text(f"{PACKAGE} categorization.rcc\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    return {d.name: sum(1 for f in d.iterdir() if f.suffix.lower() in PHOTO_EXT)
            for d in sorted((folder / "images").iterdir()) if d.is_dir()}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gcompris-photos")
    print(prepare(target))
