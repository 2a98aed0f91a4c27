"""deploy/Dockerfile builds without the nvidia runtime and writes the host's versions folder (issue 22, D10).

Docker's build steps run under the default runtime (runc) unless /etc/docker/daemon.json sets
"default-runtime": "nvidia" (NVIDIA Container Toolkit docs, "Configuring Docker"); on Jetson, CUDA and TensorRT's
driver-side libraries reach a container only through that runtime, so no RUN step may import TensorRT or create a
CUDA context. The checks read the file Docker reads; docker itself does not run here."""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "deploy" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines, as Docker does
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest))
    return out


def test_no_build_step_needs_the_gpu():
    runs = [rest for word, rest in _instructions() if word == "RUN"]
    assert runs
    for rest in runs:
        assert not re.search(r"import\s+(tensorrt|pycuda\.autoinit)|import [^\"']*\btensorrt\b", rest), rest
        assert "nvidia-smi" not in rest and "get_available_providers" not in rest, rest


def test_the_container_user_takes_the_host_folder_owner_ids():
    inst = _instructions()
    args = {rest.split("=")[0] for word, rest in inst if word == "ARG"}
    assert {"EDGE_TL_UID", "EDGE_TL_GID"} <= args
    users = [rest for word, rest in inst if word == "USER"]
    assert users == ["${EDGE_TL_UID}:${EDGE_TL_GID}"]
    useradd = next(rest for word, rest in inst if word == "RUN" and "useradd" in rest)
    assert '--uid "${EDGE_TL_UID}"' in useradd and '--gid "${EDGE_TL_GID}"' in useradd
    # the ARGs come after FROM (an ARG before FROM is not visible to later steps)
    words = [word for word, _ in inst]
    assert words.index("FROM") < max(i for i, (w, r) in enumerate(inst) if w == "ARG" and r.startswith("EDGE_TL_UID"))
