# One command each: `make test` sets up .venv and runs lint + tests;
# `make demo` sets up .venv and runs the default pre-training job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo tables clean browser summary report dashboard timings benchmark-smoke

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: an unpinned torch resolves to a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The HTML report is tested in a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint browser
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

# The benchmark scripts whose arms are training processes, run whole at their smallest size
# (about 2 minutes; `make test` runs the rest of each in process).
benchmark-smoke: $(STAMP)
	$(BIN)/python -m pytest -q -m end_to_end tests/test_benchmarks.py

demo: $(STAMP)
	$(BIN)/python train.py fit --config configs/tiny.yaml

# README's emergence and faithfulness tables, rewritten from fresh tiny.yaml and docs.yaml runs.
tables: $(STAMP)
	$(BIN)/python docs/make_tables.py

clean:
	rm -rf $(VENV) .pytest_cache

# After a run: RUN is its log directory (default: the newest runs/tiny version by number,
# version_10 after version_9).
LOGS := runs/tiny/lightning_logs
ifndef RUN
RUN := $(shell ls -d $(LOGS)/version_* 2>/dev/null | sed 's|.*/version_||' | grep -xE '[0-9]+' \
	| sort -n | tail -n 1 | sed 's|^|$(LOGS)/version_|')
endif

summary: $(STAMP)
	@test -n "$(RUN)" || (echo "make summary: set RUN=<log dir of a run>" >&2; exit 2)
	$(BIN)/normx summary "$(RUN)"

report: $(STAMP)
	@test -n "$(RUN)" || (echo "make report: set RUN=<log dir of a run>" >&2; exit 2)
	$(BIN)/normx report "$(RUN)" -o "$(RUN)/report.html"

dashboard: $(STAMP)
	@test -n "$(RUN)" || (echo "make dashboard: set RUN=<TensorBoard log dir>" >&2; exit 2)
	$(BIN)/tensorboard --logdir "$(RUN)" --samples_per_plugin images=200,text=200

# Measure `make demo` and the tests; writes the times into README.md with the date.
timings: $(STAMP)
	$(BIN)/python docs/measure_timings.py
