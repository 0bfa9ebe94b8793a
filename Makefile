# Set-up for a fresh machine: `make demo` (install, train + evaluate on the built-in data) and
# `make test` (install, run the tests). torch==2.13.0 is installed first only where torch is
# missing, so pip never resolves an unpinned torch (which would pull the CUDA build).
PYTHON ?= python3
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[test]"

# the demo trains for an epoch budget (about 1.5 s an epoch on 2 cores: ~4 min), not a wall-clock
# one, so its result does not depend on the machine's load
demo: install
	rm -rf $(DEMO_OUT)
	$(PYTHON) -m e2ip.cli train --out $(DEMO_OUT) --max-epochs 150
	$(PYTHON) -m e2ip.cli evaluate $(DEMO_OUT)/model.pt --data src/e2ip/data/demo/rmd17_ethanol_demo_test.npz --units kcal/mol --rotate --out $(DEMO_OUT)/evaluate

test: install
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check src tests benchmarks
