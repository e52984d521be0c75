# fastpeft — two commands for a newcomer:
#   make run    set up (.venv, dependencies, build) and run the main job (QLoRA fine-tune of MiniLM)
#   make test   run the tests (sets up first if needed)
# Others: make setup | make build (incremental rebuild) | make bench | make clean

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS
# CUDA arches: with a GPU visible, setup.py builds for it; without one the CUDA kernels cannot run
# here and are compiled only to prove they build, so one arch (9.0: the H100/H200 this project
# measures on) keeps the first `make run` short. Set TORCH_CUDA_ARCH_LIST to override.
TORCH_CUDA_ARCH_LIST ?= $(shell nvidia-smi -L >/dev/null 2>&1 || echo 9.0)
export TORCH_CUDA_ARCH_LIST
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.built
METHOD ?= lora

.PHONY: run setup build test bench clean

run: setup
	$(PY) examples/finetune_minilm.py --method $(METHOD)

setup: $(BUILD_STAMP)

build: $(DEPS_STAMP)
	@rm -f $(BUILD_STAMP)
	@$(MAKE) --no-print-directory $(BUILD_STAMP)

# pytest exits 5 when it collected no test; that is a failure, said in words.
test: setup
	$(PY) -m pytest tests -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# Every kernel benchmark at this device's default shapes, then the README's table.
bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done
	$(PY) benchmarks/summarize.py

$(DEPS_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

# Incremental in-place build (ninja keeps objects in build/). `pip install -e .` would recompile
# everything in a temporary folder on every call, so the repo goes on .venv's path with a .pth file.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) setup.py build_ext --inplace
	$(PY) -c 'import os, sysconfig; open(os.path.join(sysconfig.get_paths()["purelib"], "fastpeft-dev.pth"), "w").write(os.getcwd() + "\n")'
	$(PY) -c 'import fastpeft; print("fastpeft built:", fastpeft.build_info())'
	touch $@

clean:
	rm -rf build fastpeft/_C*.so csrc/build_info_generated.h $(BUILD_STAMP)
