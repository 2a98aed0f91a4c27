"""A reader of Qt's binary resource files (``.rcc``, as written by ``rcc -binary``), with no Qt dependency.

The format (qtbase src/corelib/io/qresource.cpp, src/tools/rcc/rcc.cpp; all integers big-endian):

* header: ``b"qres"``, version (u32; 1, 2 or 3), tree offset, data offset, names offset (u32 each), and from
  version 3 the overall flags (u32);
* tree: fixed-size nodes (14 bytes; 22 from version 2, which adds a u64 last-modified time), node 0 the root:
  name offset (u32), flags (u16: 1 zlib-compressed, 2 directory, 4 zstd-compressed), then for a directory the
  child count and the index of its first child (u32 each), for a file territory, language (u16 each) and the
  offset of its data (u32);
* names: at names offset + name offset, a length (u16), a hash (u32) and that many UTF-16BE code units;
* data: at data offset + data offset, a length (u32) and the bytes; zlib-compressed data is qCompress's output (a
  u32 uncompressed length, then a zlib stream).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

COMPRESSED, DIRECTORY, COMPRESSED_ZSTD = 0x01, 0x02, 0x04


class RccError(ValueError):
    """The file is not a Qt resource file this reader understands (named in the message)."""


class RccFile:
    def __init__(self, data: bytes, name: str = "resource file"):
        self.name = name
        if len(data) < 20 or data[:4] != b"qres":
            raise RccError(f"{name} is not a Qt binary resource file (no 'qres' magic)")
        self.data = data
        self.version, self.tree, self.payload, self.names = struct.unpack_from(">4I", data, 4)
        if self.version not in (1, 2, 3):
            raise RccError(f"{name}: unsupported rcc format version {self.version} (1-3 are read)")
        self.node_size = 14 if self.version == 1 else 22
        for what, off in (("tree", self.tree), ("data", self.payload), ("names", self.names)):
            if off >= len(data):
                raise RccError(f"{name}: the {what} offset {off} is past the end of the file ({len(data)} bytes); "
                               "the file is truncated")

    @classmethod
    def open(cls, path: str | Path) -> RccFile:
        return cls(Path(path).read_bytes(), str(path))

    def _u(self, fmt: str, off: int) -> tuple:
        try:
            return struct.unpack_from(fmt, self.data, off)
        except struct.error as exc:
            raise RccError(f"{self.name}: read past the end at offset {off}; the file is truncated") from exc

    def _node(self, index: int) -> tuple[int, int, int, int]:
        off = self.tree + index * self.node_size
        name_off, flags = self._u(">IH", off)
        a, b = self._u(">II", off + 6) if flags & DIRECTORY else (0, self._u(">I", off + 10)[0])
        return name_off, flags, a, b

    def _name(self, name_off: int) -> str:
        (length,) = self._u(">H", self.names + name_off)
        start = self.names + name_off + 6
        raw = self.data[start:start + 2 * length]
        if len(raw) != 2 * length:
            raise RccError(f"{self.name}: a name runs past the end of the file; the file is truncated")
        return raw.decode("utf-16-be")

    def _payload(self, data_off: int, flags: int, path: str) -> bytes:
        (size,) = self._u(">I", self.payload + data_off)
        start = self.payload + data_off + 4
        blob = self.data[start:start + size]
        if len(blob) != size:
            raise RccError(f"{self.name}: {path} runs past the end of the file; the file is truncated")
        if flags & COMPRESSED_ZSTD:
            raise RccError(f"{self.name}: {path} is zstd-compressed, which this reader does not decode")
        if flags & COMPRESSED:
            if len(blob) < 4:
                raise RccError(f"{self.name}: {path} has a compressed entry shorter than its header")
            (expect,) = struct.unpack_from(">I", blob)
            try:
                out = zlib.decompress(blob[4:])
            except zlib.error as exc:
                raise RccError(f"{self.name}: {path} is not a valid zlib stream ({exc})") from exc
            if len(out) != expect:
                raise RccError(f"{self.name}: {path} decompressed to {len(out)} bytes, its header says {expect}")
            return out
        return blob

    def walk(self) -> Iterator[tuple[str, bytes]]:
        """(path, bytes) of every file, in the tree's order; paths are '/'-joined from the root."""
        seen: set[int] = set()
        stack: list[tuple[int, str]] = [(0, "")]
        while stack:
            index, prefix = stack.pop()
            if index in seen:
                raise RccError(f"{self.name}: the tree has a cycle at node {index}")
            seen.add(index)
            name_off, flags, a, b = self._node(index)
            path = prefix if index == 0 else f"{prefix}/{self._name(name_off)}".lstrip("/")
            if flags & DIRECTORY:
                stack.extend((child, path) for child in reversed(range(b, b + a)))
            else:
                yield path, self._payload(b, flags, path)
