"""Where `edge-tl infer` gets its pictures: image files, folders, globs, video files, cameras and streams.

``open_source(spec)`` turns the SOURCE argument into an iterator of :class:`Item` (one per image or frame):

* an image file, a folder (recursive) or a glob (``'photos/**/*.jpg'``): decoded with Pillow;
* a video file (``.mp4``, ``.avi`` ...): OpenCV, read to the end;
* a V4L2 camera (``/dev/video0`` or an index such as ``0``), an RTSP/RTMP/HTTP stream, or a GStreamer
  pipeline ending in ``appsink`` (CSI cameras on Jetson: ``nvarguscamerasrc ! ... ! appsink``): OpenCV, read
  until stopped; a lost stream is reopened with exponential back-off (``max_reconnects`` attempts in a row);
* an http(s) URL that answers with one image (``Content-Type: image/*``): that picture, classified once.

An existing file or folder is always read as one, even when its name looks like a camera index (``7``) or a
pipeline (``wow!.png``); a video that opens but has no frame is an error, not an empty success.

A file that cannot be decoded, or an empty frame, becomes an Item with ``error`` set; the caller records it
and goes on. OpenCV (``cv2``) is imported only when a video source is opened.
"""

from __future__ import annotations

import glob
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.core.errors import EdgeTLError
from edge_tl.core.importer import lazy_import

cv2 = lazy_import("cv2", "video files, cameras and streams")
log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".mjpeg", ".mjpg", ".h264",
              ".h265", ".wmv", ".flv"}
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass
class Item:
    """One image or frame. ``image`` is a PIL image (files) or a BGR uint8 array (OpenCV), None on error."""

    source: str
    frame: int | None
    timestamp: float
    image: Any = None
    error: str | None = None

    @property
    def is_bgr(self) -> bool:
        return isinstance(self.image, np.ndarray)


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "images" | "video" | "camera" | "stream" | "gstreamer"
    target: str | int
    files: tuple[Path, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()  # (folder, why) found while listing: each becomes an error record

    @property
    def live(self) -> bool:
        return self.kind in ("camera", "stream", "gstreamer")


def parse_source(spec: str) -> SourceSpec:
    """Decide what SOURCE names (see the module docstring). Raises EdgeTLError when it names nothing."""
    text = spec.strip()
    if not text:
        raise EdgeTLError("SOURCE is empty", "give an image, folder, glob, video file, camera or stream URL")
    path = Path(text)
    # an existing file or folder is what it is, even when its name reads like a camera index (7) or a pipeline
    # (wow!.png); camera 7 is then /dev/video7
    if path.is_dir() and not text.startswith("/dev/"):
        files, unreadable = _list_folder(path)
        if not files and not unreadable:
            raise EdgeTLError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_EXTS))})",
                              "point at a folder of images")
        return SourceSpec("images", text, tuple(files), tuple(unreadable))
    if path.is_file():
        return SourceSpec("video" if path.suffix.lower() in VIDEO_EXTS else "images", text, (path,))
    if "!" in text:
        return SourceSpec("gstreamer", text)
    if text.lower().startswith(STREAM_SCHEMES):
        return SourceSpec("stream", text)
    if text.isdigit():
        return SourceSpec("camera", int(text))
    if text.startswith("/dev/video"):
        if not Path(text).exists():
            raise EdgeTLError(f"camera {text} does not exist", "list cameras with `ls /dev/video*` (v4l2-ctl)")
        return SourceSpec("camera", text)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise EdgeTLError(f"the pattern {text!r} matches no files", "check the pattern (quote it in the shell)")
        return SourceSpec("images", text, tuple(files))
    raise EdgeTLError(f"SOURCE {text!r} is no file, folder, glob, camera or stream URL",
                      "give an image, folder, glob, video file, /dev/videoN, a camera index, rtsp://... "
                      "or a GStreamer pipeline ending in appsink")


def _list_folder(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files under ``folder`` (recursive, sorted) and the sub-folders that could not be listed."""
    import os

    unreadable: list[tuple[str, str]] = []

    def failed(exc: OSError) -> None:
        unreadable.append((str(exc.filename or folder), f"cannot list folder: {exc.strerror or exc}"))

    files = [Path(top) / name for top, _dirs, names in os.walk(folder, onerror=failed)
             for name in names if Path(name).suffix.lower() in IMAGE_EXTS]
    return sorted(p for p in files if p.is_file()), sorted(unreadable)


def iter_images(files: tuple[Path, ...], unreadable: tuple[tuple[str, str], ...] = ()) -> Iterator[Item]:
    """Decode each file with Pillow; an undecodable one (or a video OpenCV can't open, or a folder that
    could not be listed) gives an error Item, and the others go on."""
    for where, why in unreadable:
        yield Item(where, None, time.time(), error=why)
    for path in files:
        if path.suffix.lower() in VIDEO_EXTS:  # a glob may match videos too
            try:
                yield from VideoSource(str(path), live=False).frames()
            except EdgeTLError as exc:
                yield Item(str(path), None, time.time(), error=exc.one_line())
            continue
        yield decode_image(path, str(path))


def decode_image(fp: Any, name: str) -> Item:
    """One image (a path or a binary file object) decoded with Pillow into an Item, or an error Item: a size
    the model can't take is refused from the header, before decoding."""
    from PIL import Image

    from edge_tl.core.preprocess import image_size_problem, to_rgb

    try:
        with Image.open(fp) as img:
            problem = image_size_problem(img.width, img.height)  # from the header, before decoding
            if problem:
                return Item(name, None, time.time(), error=problem)
            img.load()
            rgb = to_rgb(img)
            rgb = rgb.copy() if rgb is img else rgb
        return Item(name, None, time.time(), rgb)
    except Exception as exc:  # PIL raises many types for bad files; the record carries the reason
        return Item(name, None, time.time(), error=f"cannot decode image: {type(exc).__name__}: {exc}")


class VideoSource:
    """Frames from OpenCV's VideoCapture. ``live`` sources reconnect with exponential back-off.

    ``backoff`` is the first delay (doubling, capped at ``max_backoff``); ``max_reconnects`` bounds the
    attempts in a row (a frame read successfully resets the count). ``sleep`` is injectable for tests.
    """

    def __init__(self, target: str | int, *, live: bool, api: int | None = None, max_reconnects: int = 10,
                 backoff: float = 0.5, max_backoff: float = 30.0, sleep: Callable[[float], None] = time.sleep):
        self.target = target
        self.live = live
        self.api = api
        self.max_reconnects = max_reconnects
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep = sleep
        self.reconnects = 0

    def _open(self):
        cap = cv2.VideoCapture(self.target, self.api) if self.api is not None else cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def frames(self, keep: Callable[[int], bool] = lambda i: True) -> Iterator[Item]:
        """Yield Items; frames where ``keep(index)`` is False are grabbed but not decoded (cheap skipping)."""
        name = str(self.target)
        index = 0
        failures = 0
        while True:
            cap = self._open()
            if cap is None and not self.live:
                raise EdgeTLError(f"OpenCV cannot open video {name}", "check the file plays (ffprobe) and its codec")
            try:
                while cap is not None:
                    if not cap.grab():
                        break
                    failures = 0
                    i = index
                    index += 1
                    if not keep(i):
                        continue
                    ok, frame = cap.retrieve()
                    if not ok or frame is None or frame.size == 0:
                        yield Item(name, i, time.time(), error="empty or undecodable frame")
                        continue
                    yield Item(name, i, time.time(), frame)
            finally:
                if cap is not None:
                    cap.release()
            if not self.live:
                if index == 0:  # opened, but not one frame: an empty or broken file is not a clean run
                    yield Item(name, None, time.time(), error="the video has no frames (empty or unreadable)")
                return
            failures += 1
            if failures > self.max_reconnects:
                raise EdgeTLError(f"stream {name} lost; {self.max_reconnects} reconnect attempt(s) failed",
                                  "check the camera or network, or raise --max-reconnects")
            delay = min(self.backoff * 2 ** (failures - 1), self.max_backoff)
            self.reconnects += 1
            yield Item(name, None, time.time(),
                       error=f"stream lost; reconnecting in {delay:.1f}s (attempt {failures}/{self.max_reconnects})")
            self.sleep(delay)


def _video_or_error(items: Iterator[Item], name: str) -> Iterator[Item]:
    """A video file that can't be opened becomes one error record (the run's exit code then says so)."""
    try:
        yield from items
    except EdgeTLError as exc:
        yield Item(name, None, time.time(), error=exc.one_line())


#: the largest still image read from an http(s) URL (a picture, not a download)
MAX_STILL_BYTES = 64 << 20


def _http_still(url: str, timeout: float = 10.0) -> Item | None:
    """An Item for an http(s) URL that answers with one image (Content-Type image/*), else None: a stream
    (MJPEG's multipart/x-mixed-replace, HLS, ...) or a server that can't be reached now, both left to OpenCV and
    its reconnects. Without this, OpenCV read the one picture as a "live stream" that ended, and infer reopened
    it with back-off until its reconnect attempts ran out."""
    import io
    import urllib.error
    import urllib.request

    if not url.lower().startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "image/*, */*"}),
                                    timeout=timeout) as resp:
            kind = (resp.headers.get_content_type() or "").lower()
            if not kind.startswith("image/"):
                return None
            body = resp.read(MAX_STILL_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    if len(body) > MAX_STILL_BYTES:
        return Item(url, None, time.time(), error=f"the image at the URL is over {MAX_STILL_BYTES >> 20} MiB")
    return decode_image(io.BytesIO(body), url)


def _gstreamer_api() -> int:
    info = cv2.getBuildInformation()
    line = next((ln for ln in info.splitlines() if "GStreamer:" in ln), "")
    if "YES" not in line:
        raise EdgeTLError("this OpenCV was built without GStreamer, so it cannot open a GStreamer pipeline",
                          "on Jetson use JetPack's OpenCV (python3-opencv), not the opencv-python wheel")
    return cv2.CAP_GSTREAMER


def _captured(src: SourceSpec, keep: Callable[[int], bool], max_reconnects: int, backoff: float) -> Iterator[Item]:
    """Frames of a video file, camera, stream or pipeline through OpenCV (an http(s) URL serving one picture:
    that picture, once)."""
    api = None
    if src.kind == "gstreamer":
        api = _gstreamer_api()
    elif src.kind == "camera":
        api = cv2.CAP_V4L2 if isinstance(src.target, str) else cv2.CAP_ANY
    elif src.kind == "stream":
        still = _http_still(str(src.target))
        if still is not None:
            return iter([still])
        api = cv2.CAP_FFMPEG
    items = VideoSource(src.target, live=src.live, api=api, max_reconnects=max_reconnects,
                        backoff=backoff).frames(keep)
    return _video_or_error(items, str(src.target)) if src.kind == "video" else items


def open_source(spec: str | SourceSpec, *, every: int = 1, max_fps: float | None = None,
                max_reconnects: int = 10, backoff: float = 0.5) -> Iterator[Item]:
    """Items from SOURCE: every ``every``-th frame, at most ``max_fps`` per second (live sources drop the
    frames in between; files are paced by sleeping)."""
    if every < 1:
        raise EdgeTLError(f"--every must be >= 1 (got {every})", "use 1 to process every frame")
    if max_fps is not None and not 0 < max_fps < float("inf"):  # nan and inf too
        raise EdgeTLError(f"--max-fps must be > 0 (got {max_fps})", "leave it out for no limit")
    src = spec if isinstance(spec, SourceSpec) else parse_source(spec)
    interval = 1.0 / max_fps if max_fps else 0.0
    last = [float("-inf")]

    def keep(i: int) -> bool:
        if i % every:
            return False
        if src.live and interval:
            now = time.monotonic()
            if now - last[0] < interval:
                return False
            last[0] = now
        return True

    if src.kind == "images":
        items: Iterator[Item] = (it for n, it in enumerate(iter_images(src.files, src.unreadable))
                                 if n % every == 0)
    else:
        items = _captured(src, keep, max_reconnects, backoff)
    for item in items:
        if interval and not src.live:
            wait = last[0] + interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            last[0] = time.monotonic()
        yield item
