"""What runs on the Jetson: runtime, engine, bench, power, facts, serve, infer, doctor and the device half of
deploy. Never imports :mod:`edge_tl.workstation` or torch (import-linter contracts in pyproject.toml)."""
