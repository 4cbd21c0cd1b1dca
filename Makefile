PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo lint test test-slow test-all bench clean

# The venv is rebuilt whenever the package metadata changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -e '.[test]'
	@# pip byte-compiles what it installs on one core (40 s here); both cores take half of that. A few
	@# files written for newer Pythons than this one fail to compile, as they do under pip: harmless.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# Most tests are small and spend their time in Python, on one core whatever torch's thread count:
# a process per core, each on one thread, runs the suite 1.5x as fast on 2 cores as one process on
# two threads. A file's tests stay in one process, so that its fixtures are built once. At most 8
# processes: each holds a gigabyte or two, and with more the longest files bound the run anyway.
TEST_PROCESSES ?= $(shell n=$$(nproc); echo $$(( n < 8 ? n : 8 )))
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

test: lint
	$(PYTEST)

test-slow: $(STAMP)
	$(PYTEST) -m slow

test-all: $(STAMP)
	$(PYTEST) -m ''

bench: $(STAMP)
	$(BIN)/python benchmarks/ms_deform_attn.py
	$(BIN)/python benchmarks/model.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/train_batches.py
	$(BIN)/python benchmarks/check_data.py

demo: $(STAMP)
	$(BIN)/deformable-detr demo

clean:
	rm -rf $(VENV)
