# convcrf developer commands. `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch installed before the project. pip takes torch 2.13.0 from local disk where a CPU
# wheel of it lies (the CI machines); from PyPI on Linux it is a multi-GB CUDA build, as a plain
# `torch` would be: elsewhere, set TORCH_SPEC to the torch you have or want ('torch>=2.1').
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-gpu-shim demo bench lint format clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	PYTHONSAFEPATH=1 $(PY) -m pytest -q

# the GPU tests that need CuPy but not torch on CUDA, on the C++ shim (not the three largest,
# hours there): their own code checked before a device session (11 minutes on 2 cores)
test-gpu-shim: install
	CONVCRF_GPU_TESTS_ON_SHIM=1 PYTHONSAFEPATH=1 $(PY) -m pytest -q -rs tests/test_gpu.py -k "not 2048 and not larger_than and not tuning"

demo: install
	$(VENV)/bin/convcrf refine sample_data/image.jpg sample_data/unary.npy \
		-o demo_out/labels.png --overlay demo_out/overlay.png --probs demo_out/probs.npy -v
	@echo "wrote demo_out/labels.png, demo_out/overlay.png, demo_out/probs.npy"

bench: install
	$(PY) bench/bench_cpu.py
	@$(PY) -c "import pydensecrf" 2>/dev/null || $(PY) -m pip install -q "pydensecrf2==1.1" || true
	@if $(PY) -c "import pydensecrf" 2>/dev/null; then $(PY) bench/bench_densecrf.py; \
	else echo "bench/bench_densecrf.py skipped: pydensecrf2 does not build here"; fi
	$(PY) bench/bench_batch.py
	@if $(PY) -I -c "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0" \
		2>/dev/null; then PYTHONSAFEPATH=1 $(PY) bench/bench_gpu.py; \
	else echo "bench/bench_gpu.py skipped: CuPy or a CUDA device is missing"; fi

lint: install
	$(PY) -m ruff check convcrf_cli tests bench
	$(PY) -m ruff format --check convcrf_cli tests bench

format: install
	$(PY) -m ruff format convcrf_cli tests bench
	$(PY) -m ruff check --fix convcrf_cli tests bench

clean:
	rm -rf $(VENV) demo_out build *.egg-info
