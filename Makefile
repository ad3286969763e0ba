# Two commands: `make book` (set up, run the default profile, build the HTML book) and `make test`.
# PROFILE picks params/<PROFILE>.yaml; TORCH_SPEC lets GPU users pick their torch build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
TORCH_SPEC ?= torch==2.13.0
WORKERS ?= 2
# The LLM judge's llama.cpp binding: built from source once (~3 min on 2 cores) and kept as a wheel.
# LLAMA_NATIVE=1 (default) builds it for this CPU (GGML_NATIVE=ON: AVX-512 where the CPU has it;
# 1.49x the portable build's rate on the judge's requests here, bench/RESULTS.md) and caches it
# under a folder named by a hash of the CPU's instruction-set flags, so a machine with other flags
# never loads it; LLAMA_NATIVE=0 builds the portable (AVX2) one.
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
LLAMA_NATIVE ?= 1
WHEELS ?= $(HOME)/.cache/saelib/wheels
CPU_TAG := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-12)
ifeq ($(LLAMA_NATIVE),1)
LLAMA_WHEELS := $(WHEELS)/native-$(CPU_TAG)
LLAMA_CMAKE := -DGGML_NATIVE=ON
else
LLAMA_WHEELS := $(WHEELS)
LLAMA_CMAKE := -DGGML_NATIVE=OFF
endif
PYTEST_ARGS ?=

.PHONY: all venv prepare grid book test test-fast bench clean-book clean

all: book

$(VENV)/.stamp: pyproject.toml requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	# torch first: a CPU build from the local disk here; anything later sees it satisfied.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,triton]"
	# llama-cpp-python for the LLM judge (saelib.judges.llama), with its OpenAI-compatible server
	# (tested on loopback). The wheel is built once into $(LLAMA_WHEELS) (above); later venvs reuse
	# it. --no-cache-dir: pip's own cache would hand back a wheel built with other CMAKE_ARGS.
	mkdir -p $(LLAMA_WHEELS)
	ls $(LLAMA_WHEELS)/$(subst -,_,$(firstword $(subst ==, ,$(LLAMA_CPP_SPEC))))-$(lastword $(subst ==, ,$(LLAMA_CPP_SPEC)))-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip wheel --quiet --no-cache-dir --no-deps \
	    --no-binary llama-cpp-python -w $(LLAMA_WHEELS) "$(LLAMA_CPP_SPEC)"
	$(PY) -m pip install --quiet --no-cache-dir --find-links $(LLAMA_WHEELS) --only-binary llama-cpp-python \
	  "$(subst ==,[server]==,$(LLAMA_CPP_SPEC))"
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	# sae-bench only for the cross-check of the core metrics (tests/test_saebench_core.py):
	# --no-deps, since its torchvision pin would pull a CUDA torch.
	$(PY) -m pip install --quiet --no-deps "sae-bench==0.6.0"
	touch $@

venv: $(VENV)/.stamp

prepare: venv
	HF_HUB_OFFLINE=1 $(PY) -m saelib.prepare --profile $(PROFILE)

grid: prepare
	HF_HUB_OFFLINE=1 $(PY) -m saelib.grid --profile $(PROFILE) --workers $(WORKERS)

book: grid
	$(PY) -m saelib.book --profile $(PROFILE)
	@echo "Book: $(CURDIR)/_build/html/index.html"

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m saelib.prepare --profile smoke
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: prepare
	for b in bench/*.py; do HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

clean-book:
	rm -rf _build book/executed book/generated

clean: clean-book
	rm -rf runs
