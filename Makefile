# Two entry points for a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Run anything that starts Ray with loopback as the only network where the project's guard exists.
OFFLINE := $(shell test -x ../shared/tools/offline && echo ../shared/tools/offline)
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml docker/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash docker/install.sh
	touch $@

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/reinforge demo --output runs/demo

# ORDER=--reverse runs the suite backwards (as CI does): no test may lean on what another left behind.
test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -p no:cacheprovider $(ORDER) tests

bench: $(STAMP)
	$(OFFLINE) $(PY) bench/imagenet_plus.py

clean:
	rm -rf runs
