"""What only the workstation runs (``edge-tl build`` and the client half of ``edge-tl deploy``).

Needs the ``workstation`` extra (torch, torchvision, Torch-Pruning, onnxslim). The device never imports this
package (import-linter contract in pyproject.toml; tests/test_no_torch.py).
"""
