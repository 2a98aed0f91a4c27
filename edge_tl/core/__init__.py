"""Shared by both machines: the bundle format, preprocessing, errors, targets, file helpers, the device's
folder layout and the optional-import helper. Imports neither :mod:`edge_tl.workstation` nor
:mod:`edge_tl.device` (import-linter contract in pyproject.toml)."""
