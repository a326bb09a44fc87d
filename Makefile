# The two commands of the README, plus benchmarks. Each target creates .venv
# and installs the project into it when missing or when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The radius sweep fails some runs on purpose (exit 1); only usage errors stop.
demo: $(STAMP)
	$(BIN)/dlmin run experiments.yaml -o results; test $$? -le 1
	$(BIN)/dlmin plot results/*/ --what all > /dev/null
	@# a sweep's folder figures compare its runs; each run also gets its own
	$(BIN)/dlmin plot --what all $$(for d in results/*/; do \
	  set -- "$$d"*.h5; [ $$# -gt 1 ] && echo "$$@"; done) > /dev/null

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	@for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) results/*/ .pytest_cache .hypothesis
