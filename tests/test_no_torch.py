"""The device side installs and runs without the training stack.

Each check runs in a fresh interpreter where torch, torchvision, torch_pruning, onnxslim and sklearn (and
the device extras TensorRT, pycuda, cuda-python, jtop, pynvml) cannot be imported: a meta-path finder
raises ImportError for them, as on a Jetson without those wheels. Every module outside the workstation
package must import there, and importing them must not pull any blocked package in.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import textwrap

import edge_tl

BLOCKED = ["torch", "torchvision", "torch_pruning", "onnxslim", "sklearn",
           "tensorrt", "pycuda", "cuda", "jtop", "pynvml"]

# The workstation's package (the training stack and the deploy client); the device never imports it. Every
# other module (core, device, cli) must import without the blocked packages.
WORKSTATION = "edge_tl.workstation"

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {BLOCKED!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: not installed on this device")
            return None
    sys.meta_path.insert(0, Block())
""")


def all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(edge_tl.__path__, "edge_tl."))


def device_modules() -> list[str]:
    return [m for m in all_modules() if m != WORKSTATION and not m.startswith(WORKSTATION + ".")]


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_blocker_really_blocks():
    proc = run_blocked("import torch")
    assert proc.returncode != 0
    assert "torch is blocked" in proc.stderr


def test_every_device_module_imports_without_torch():
    mods = device_modules()
    # the stages of the device side must all be covered by this walk
    for stage in ("edge_tl.core.bundle", "edge_tl.device.runtime.onnxrt", "edge_tl.cli"):
        assert stage in mods
    proc = run_blocked(f"""
        import importlib, json, sys
        failed = {{}}
        for name in {mods!r}:
            try:
                importlib.import_module(name)
            except Exception as exc:
                failed[name] = f"{{type(exc).__name__}}: {{exc}}"
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        print(json.dumps({{"failed": failed, "leaked": leaked}}))
    """)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    assert result["leaked"] == []


def test_cli_help_and_device_commands_run_without_torch(tiny_bundle_src):
    proc = run_blocked(f"""
        import sys
        from edge_tl.cli import main
        sys.argv = ["edge-tl", "--help"]
        try:
            main()
        except SystemExit as e:
            print("EXIT", e.code)
        from edge_tl.device.runners import create_runner
        from edge_tl.core.bundle import Bundle
        b = Bundle.open({str(tiny_bundle_src)!r})
        b.verify()
        with create_runner(b, backend="ort-cpu", precision="int8") as r:
            out = r.infer(b.golden_inputs())["logits"]
        print("SHAPE", out.shape)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "EXIT 0" in proc.stdout
    assert "SHAPE (6, 4)" in proc.stdout
    assert "Usage" in proc.stdout


def test_workstation_commands_say_the_extra_is_missing(tmp_path, tiny_bundle_src):
    """Without torch, `edge-tl build` and the torch backend stop with one line naming the workstation extra."""
    pt2 = tmp_path / "model.pt2"
    pt2.write_bytes(b"not read")
    proc = run_blocked(f"""
        import sys
        from edge_tl.cli import main
        from edge_tl.core.errors import EdgeTLError
        from edge_tl.device.runners import create_runner
        try:
            create_runner({str(pt2)!r}, backend="auto")
        except EdgeTLError as exc:
            print("RUNNER", exc.one_line())
        main(["build", "--out", {str(tmp_path / "run")!r}])
    """)
    assert proc.returncode == 2, proc.stderr
    runner_line = next(line for line in proc.stdout.splitlines() if line.startswith("RUNNER"))
    assert "needs the workstation's training stack, and 'torch' is not installed" in runner_line
    assert "edge-tl[workstation" in runner_line
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: edge-tl build needs the workstation's training stack")
    assert not (tmp_path / "run").exists()
