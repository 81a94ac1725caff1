# The README's two commands: `make demo` (set up + run the main job on the embedded CIFAR-10-LT banks)
# and `make test` (set up + run the whole test suite). Everything is installed into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := examples/cifar10lt
RUNS := runs/demo

.PHONY: setup demo test test-fast lint clean

$(BIN)/disalign: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch + torchvision first, pinned: these builds lie on the local disk of these machines (no download).
	# torchvision is needed by the detection path (torchvision detectors, pycocotools AP) and its tests.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,detection]'
	touch $@

setup: $(BIN)/disalign

demo: setup
	$(BIN)/disalign fit $(DEMO)/train.h5 --val $(DEMO)/val.h5 --rho auto --out $(RUNS)/calibration
	$(BIN)/disalign eval $(DEMO)/test.h5 --calibration $(RUNS)/calibration --train $(DEMO)/train.h5 --val $(DEMO)/val.h5 \
		--json $(RUNS)/report.json --plots $(RUNS)/plots --overwrite

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check calib feature_extract service tests bench examples

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
