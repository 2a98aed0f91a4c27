"""Write one section of benchmarks/RESULTS.md (each benchmark script owns one section)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path

from edge_tl.core.host import cpu_name

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nWritten by the scripts in `benchmarks/`; each section says how and where it ran.\n"


def machine_line(threads: int | None = None) -> str:
    threads_txt = f", {threads} inference thread(s)" if threads else ""
    return (f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs{threads_txt}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}. Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC."
            f"{_load()}")


def _load() -> str:
    """The 1/5/15-minute load average when the section is written (how busy the machine was for its timings)."""
    try:
        return " Load average {:.1f} / {:.1f} / {:.1f} (1/5/15 min).".format(*os.getloadavg())
    except OSError:
        return ""


def write_section(name: str, body: str) -> Path:
    """Replace (or append) the section delimited by <!-- begin:name --> / <!-- end:name -->."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"<!-- begin:{name} -->\n{body.rstrip()}\n<!-- end:{name} -->"
    pattern = re.compile(rf"<!-- begin:{re.escape(name)} -->.*?<!-- end:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    return RESULTS
