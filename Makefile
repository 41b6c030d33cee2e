# Two commands do all set-up on a fresh machine:  `make test`  and  `make bench`.
# Both create .venv when missing, install the pinned torch, build genkern._C, then run.
PYTHON_BOOT ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
TORCH_PIN   := torch==2.14.1 torchvision==0.29.1
DEV_DEPS    := ninja numpy pytest pytest-benchmark expecttest tqdm matplotlib diffusers scikit-learn
SOURCES     := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
export MAX_JOBS ?= 2
# The venv's stamp is named by a checksum of what it installs: changing the pins reinstalls (and rebuilds
# genkern._C), other edits of this Makefile do not (a stamp that depended on the Makefile did both).
DEPS_STAMP  := $(VENV)/.deps-$(shell echo '$(PYTHON_BOOT) $(TORCH_PIN) $(DEV_DEPS)' | cksum | cut -d' ' -f1)

.PHONY: test bench demo build venv clean gpu-check gpu-env-check

test: build
	$(PY) -m pytest tests -q -ra

bench: build
	$(PY) -m bench $(BENCH_ARGS)
	$(MAKE) --no-print-directory demo

# The reference models' path end to end, briefly: train the digits DDPM, write a grid of samples, score them.
demo: build
	$(PY) -m models.ddpm train --steps $(DEMO_STEPS) --out runs/ddpm-digits-brief --quiet
	$(PY) -m models.ddpm sample --ckpt runs/ddpm-digits-brief/ckpt.pt --out runs/ddpm-digits-brief/samples.png
	$(PY) -m models.ddpm evaluate --ckpt runs/ddpm-digits-brief/ckpt.pt --n 300 --quiet --out runs/ddpm-digits-brief/quality.json
DEMO_STEPS ?= 300

build: genkern/_C.so

venv: $(DEPS_STAMP)

$(DEPS_STAMP): pyproject.toml
	@command -v $(PYTHON_BOOT) >/dev/null || { echo "need $(PYTHON_BOOT) (set PYTHON_BOOT=...)"; exit 1; }
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q $(DEV_DEPS)
	rm -f $(VENV)/.deps*
	touch $@

# torch is already in the venv, so build against it (no isolated build env).
genkern/_C.so: $(DEPS_STAMP) $(SOURCES)
	$(PIP) install -q -e . --no-build-isolation --no-deps
	@test -f $@ && touch $@

# On a GPU machine with torch preinstalled (no venv, no registry): build, test, benchmark into $(OUT).
OUT ?= gpu_check_out
gpu-check:
	bash scripts/gpu_check.sh $(OUT)

# The GPU machine's torch (2.11: C++17, triton 3.6) here on the CPU: build and test against it, so that
# a GPU lease does not find out (scripts/gpu_env_check.sh; CI runs it after `make test`).
gpu-env-check:
	bash scripts/gpu_env_check.sh

clean:
	rm -rf build *.egg-info genkern/_C*.so genkern/_build_info.json
