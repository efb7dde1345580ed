# iommu-emu: the two commands a newcomer needs are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint clean fuzz

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Repeatable: --overwrite reruns the same run id; the report and its plots go to _report/.
run: $(STAMP)
	$(BIN)/iommu-emu run configs/quickstart.toml --out results --overwrite
	$(BIN)/iommu-emu report results/quickstart --out results/quickstart/_report --format csv >/dev/null
	@echo "report and plots: results/quickstart/_report/report.md"

test: $(STAMP)
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo 'pytest collected no tests' >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# A hostile-guest fuzz campaign (tests/fuzz): >= 1,000,000 operations, fixed default seed.
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz --ops 1000000

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) results .pytest_cache
