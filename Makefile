# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
OUT = out

.PHONY: install demo test clean

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

test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT)
