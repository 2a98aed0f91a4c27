# The two commands a new user types (see README):  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
EXTRAS ?= workstation,cpu,serve,deploy,fleet,plots,test
comma  := ,
STAMP   = $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test install lint bench clean device-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

# The device install, as on a Jetson: the core and the device extras only, no torch (tests/test_device_install.py
# runs the device commands in it).
# With Python 3.10 where the machine has it: the Jetson's system Python on JetPack 6.
DEVICE_PYTHON ?= $(firstword $(foreach p,python3.10 $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10),$(shell $(p) -c 'import venv' >/dev/null 2>&1 && echo $(p))) $(PYTHON))
DEVICE_VENV ?= .venv-device
DEVICE_STAMP = $(DEVICE_VENV)/.installed-cpu-serve
$(DEVICE_STAMP): pyproject.toml
	$(DEVICE_PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEVICE_VENV)/bin/python -m pip install -q -e ".[cpu,serve]"
	touch $@

device-venv: $(DEVICE_STAMP)

demo: install
	$(BIN)/edge-tl build --out runs/demo --overwrite

# The suite runs in TEST_WORKERS processes (pytest-xdist; one per CPU core, at most 4), each test file whole in one
# process (its shared builds made once), every process with one torch/OpenMP thread: the numerics are then the
# same on every machine whatever its core count, and two builds never fight over the cores (on 2 cores: 6 min,
# against 12 one file after the other with two threads). TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ "$$n" -gt 4 ] && n=4; echo $$n)

test: lint device-venv
	OMP_NUM_THREADS=1 EDGE_TL_DEVICE_VENV=$(DEVICE_VENV) $(BIN)/python -m pytest -q -ra --durations=15 \
	  -n $(TEST_WORKERS) --dist loadfile

# Style (ruff) and architecture (import-linter's contracts in pyproject.toml; see docs/architecture.md).
lint: install
	$(BIN)/ruff check edge_tl tests benchmarks models
	$(BIN)/lint-imports

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEVICE_VENV) runs .pytest_cache
