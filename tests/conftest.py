from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
FIXTURES = TESTS / "data"

from bundle_factory import make_tiny_bundle  # noqa: E402

# Signing (edge_tl.core.signing): one session key, trusted by this session's "devices" (every test process and,
# through tests/sshd_helper.py, every sshd session). Builds sign with it instead of making a key in ~/.config, and a
# test that needs an unsigned bundle or a keyless device says so. Set before any test imports edge_tl's CLI.
_KEYS = tempfile.mkdtemp(prefix="edge-tl-test-keys-")
atexit.register(shutil.rmtree, _KEYS, True)
os.environ["EDGE_TL_SIGNING_KEY"] = os.path.join(_KEYS, "session.key")
os.environ["EDGE_TL_TRUSTED_KEYS"] = os.path.join(_KEYS, "trusted")
os.environ.pop("EDGE_TL_SIGNING_PASSPHRASE", None)


def _session_key() -> None:
    from edge_tl.core.signing import generate_key

    _, pub, kid = generate_key(os.environ["EDGE_TL_SIGNING_KEY"], "edge-tl tests")
    trusted = Path(os.environ["EDGE_TL_TRUSTED_KEYS"])
    trusted.mkdir()
    shutil.copy(pub, trusted / f"{kid}.pub")


_session_key()

# .tar.gz bundles are unpacked into a cache (edge_tl.core.bundle.bundle_cache_dir): keep the tests' out of ~/.cache
if "EDGE_TL_BUNDLE_CACHE" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="edge-tl-test-bundle-cache-")
    os.environ["EDGE_TL_BUNDLE_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, True)


@pytest.fixture(scope="session")
def tiny_bundle_src(tmp_path_factory) -> Path:
    """One tiny bundle (dir + .tar.gz) per session; copy it before modifying (see ``tiny_bundle``)."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture
def tiny_bundle(tiny_bundle_src, tmp_path) -> Path:
    """A private copy of the tiny bundle folder, safe to modify."""
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_bundle_src, dst)
    return dst


@pytest.fixture
def fake_trtexec(tmp_path) -> Path:
    """tests/data/fake_bin/trtexec (replays recorded trtexec output) as an executable run by this Python and
    reading its recordings from tests/data wherever the copy lives."""
    exe = tmp_path / "bin" / "trtexec"
    exe.parent.mkdir()
    text = (FIXTURES / "fake_bin" / "trtexec").read_text().replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1)
    exe.write_text(text.replace("Path(__file__).resolve().parent.parent", f"Path({str(FIXTURES)!r})"))
    exe.chmod(0o755)
    return exe


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def bundle(tiny_bundle_src):
    """The tiny bundle, opened (read-only: use ``tiny_bundle`` to modify one)."""
    from edge_tl.core.bundle import Bundle

    return Bundle.open(tiny_bundle_src)


@pytest.fixture(scope="session")
def reference(bundle):
    """What ONNX Runtime computes directly with the bundle's default (INT8) model: logits for an input batch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle.model_path("int8")), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"input": x})[0]
