# One entry point for people and CI. Everything it needs is installed here, into ignored folders
# (.venv, .cache), and reused on the next run when the inputs have not changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE := .cache
LLAMA_VERSION := 0.3.36
# llama.cpp's -march=native build enables AMX on these CPUs and crashes in the first decode
# (llama.cpp issue 20824): name the SIMD levels instead. AVX-512 only where this CPU has it.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  $(if $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo y),-DGGML_AVX512=ON,-DGGML_AVX512=OFF)
# Built wheels live in pip's cache folder, so a fresh clone (CI) reuses them; the key covers the flags.
WHEEL_CACHE := $(or $(shell $(PYTHON) -m pip cache dir 2>/dev/null),$(CACHE))/appliance-wheels
LLAMA_WHEEL_DIR := $(WHEEL_CACHE)/llama-$(LLAMA_VERSION)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)
# apt packages: espeak-ng and sox make test speech; systemd-python builds against libsystemd
APT_PACKAGES := espeak-ng sox libsystemd-dev pkg-config
STATE := $(CACHE)/run
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv llama-wheel llama-tools bench-chat bench-chat-avx2 image image-tools image-test image-test-update image-repro apt test test-fast run demo-bundle lint clean bench-chat-python bench-embed bench-asr

help:
	@echo "make run    build + sign the demo bundle, import it into $(STATE), serve it on :8080"
	@echo "make test   install what is needed and run the whole test suite"

apt:
	@[ -z "$(strip $(APT_PACKAGES))" ] && exit 0; missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# llama-cpp-python has no wheels on PyPI: build it once from the sdist and keep the wheel
# (without pip's own wheel cache, which ignores CMAKE_ARGS).
llama-wheel:
	@if ! ls $(LLAMA_WHEEL_DIR)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_VERSION) from source (about 10 minutes on 2 cores, once)"; \
	  mkdir -p $(LLAMA_WHEEL_DIR).tmp && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PYTHON) -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
	    -w $(LLAMA_WHEEL_DIR).tmp llama-cpp-python==$(LLAMA_VERSION) && \
	  rm -rf $(LLAMA_WHEEL_DIR) && mv $(LLAMA_WHEEL_DIR).tmp $(LLAMA_WHEEL_DIR); \
	fi

# llama.cpp's own server and batched bench, built from the source tree that the
# llama-cpp-python sdist vendors (no other download), with the same flags as the wheel.
LLAMA_TOOLS_DIR := $(WHEEL_CACHE)/llama-tools-$(LLAMA_VERSION)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)
llama-tools:
	@if [ ! -x $(LLAMA_TOOLS_DIR)/bin/llama-server ] || [ ! -x $(LLAMA_TOOLS_DIR)/bin/llama-batched-bench ]; then \
	  echo "building llama-server and llama-batched-bench $(LLAMA_VERSION) (a few minutes, once)"; \
	  tmp=$$(mktemp -d) && \
	  $(PYTHON) -m pip download -q --no-deps --no-binary :all: -d $$tmp llama-cpp-python==$(LLAMA_VERSION) && \
	  tar xzf $$tmp/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $$tmp && \
	  cmake -S $$tmp/llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp -B $$tmp/build -DCMAKE_BUILD_TYPE=Release \
	    $(LLAMA_CMAKE_ARGS) -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null && \
	  cmake --build $$tmp/build -j$$(nproc) --target llama-server llama-batched-bench >/dev/null && \
	  mkdir -p $(LLAMA_TOOLS_DIR)/bin && cp $$tmp/build/bin/llama-server $$tmp/build/bin/llama-batched-bench $(LLAMA_TOOLS_DIR)/bin/ && \
	  rm -rf $$tmp; \
	fi

# The venv is rebuilt only when pyproject.toml or the llama wheel changed (stamp holds their hash).
venv: apt llama-wheel
	@stamp=$$(cat pyproject.toml $(LLAMA_WHEEL_DIR)/*.whl | sha256sum | cut -c1-64); \
	if [ "$$(cat $(VENV)/.stamp 2>/dev/null)" != "$$stamp" ]; then \
	  echo "setting up $(VENV)"; \
	  [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip && \
	  $(PY) -m pip install -q $(LLAMA_WHEEL_DIR)/*.whl && \
	  $(PY) -m pip install -q -e '.[dev,convert,bench]' && \
	  echo "$$stamp" > $(VENV)/.stamp; \
	fi

# Everything: unit, models and API tests, then the x86_64-cpu image built and booted under qemu,
# and the Jetson flow (arm64 through qemu-user) against dummy L4T packages. The arm64 disk's own
# boot test (`make image-test TARGET=arm64`, about 15 minutes) is left out.
# The two builds run at idle priority (SCHED_IDLE) beside the tests: the x86 image beside the
# unit tests, the Jetson flow beside the boot test. They get only the CPU time the tests leave,
# so they never preempt a two-thread decode, which stalls at every barrier when one of its
# threads loses its core. Their output follows the tests'.
test: venv image-tools
	@logs=$$(mktemp -d); \
	chrt --idle 0 $(MAKE) --no-print-directory image TARGET=x86_64-cpu \
	  IMAGE_FLAGS=--no-system-update > $$logs/image 2>&1 & image=$$!; \
	$(PY) -m pytest -m 'not image' -q; unit=$$?; \
	wait $$image; built=$$?; echo "--- the x86_64-cpu image, built beside the tests:"; \
	cat $$logs/image; [ $$unit -eq 0 ] && [ $$built -eq 0 ] || { rm -rf $$logs; exit 1; }; \
	chrt --idle 0 $(MAKE) --no-print-directory image-test TARGET=jetson > $$logs/jetson 2>&1 & \
	jetson=$$!; \
	IMAGE_TARGET=x86_64-cpu $(PY) -m pytest -m image -q -s tests/test_image.py; boot=$$?; \
	wait $$jetson; flow=$$?; echo "--- the Jetson flow, run beside the boot test:"; \
	cat $$logs/jetson; rm -rf $$logs; [ $$boot -eq 0 ] && [ $$flow -eq 0 ]

test-fast: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check appliance tests && $(VENV)/bin/mypy appliance

demo-bundle: venv
	@mkdir -p $(CACHE)/keys out
	@[ -f $(CACHE)/keys/demo.key ] || $(VENV)/bin/appliance-build keygen --out $(CACHE)/keys/demo
	$(VENV)/bin/appliance-build bundle bundles/demo.toml --key $(CACHE)/keys/demo.key --out out

# A throwaway device: a fresh state root each time, trusting the local demo key, serving on
# loopback without API keys (the only place where auth may be off).
run: demo-bundle
	@rm -rf $(STATE); export APPLIANCE_ROOT=$(abspath $(STATE)); \
	$(VENV)/bin/appliance-ctl keys add $(CACHE)/keys/demo.pub && \
	$(VENV)/bin/appliance-ctl bundle import out/demo-1.bundle && \
	$(VENV)/bin/appliance-ctl status && \
	APPLIANCE_AUTH=false exec $(VENV)/bin/appliance-ctl serve

# Benchmarks print a table with the peer measured in the same run; run them on a quiet machine.
# bench-chat runs each row 5 times per server, alternating (about 30 minutes on 2 cores).
bench-chat: venv llama-tools
	$(PY) bench/chat.py --peers llama-server --clients 1 4 8 16 --max-tokens 128 512 --repeats 5 --extras \
	  --llama-tools $(LLAMA_TOOLS_DIR)/bin

# The same rows with llama.cpp built without AVX-512 on both sides (our wheel, llama-server):
# AVX2's kernels, measured on an AVX-512 machine (its caches and memory stay this machine's).
LLAMA_AVX2_ARGS := $(filter-out -DGGML_AVX512=%,$(LLAMA_CMAKE_ARGS)) -DGGML_AVX512=OFF
LLAMA_AVX2_HASH := $(shell echo '$(LLAMA_AVX2_ARGS)' | sha256sum | cut -c1-12)
bench-chat-avx2: venv
	$(MAKE) llama-wheel llama-tools LLAMA_CMAKE_ARGS="$(LLAMA_AVX2_ARGS)"
	rm -rf $(CACHE)/llama-avx2 && $(PY) -m pip install -q --no-deps --target $(CACHE)/llama-avx2 \
	  $(WHEEL_CACHE)/llama-$(LLAMA_VERSION)-$(LLAMA_AVX2_HASH)/*.whl
	PYTHONPATH=$(abspath $(CACHE)/llama-avx2) $(PY) bench/chat.py --peers llama-server \
	  --clients 1 4 8 --max-tokens 128 512 --repeats 5 \
	  --llama-tools $(WHEEL_CACHE)/llama-tools-$(LLAMA_VERSION)-$(LLAMA_AVX2_HASH)/bin

bench-chat-python: venv
	$(PY) bench/chat.py

bench-embed: venv
	$(PY) bench/embed.py

bench-asr: venv apt
	$(PY) bench/asr.py

TARGET ?= x86_64-cpu
IMAGE_TOOLS := mmdebstrap genimage e2fsprogs dosfstools mtools qemu-system-x86 qemu-utils ovmf \
  qemu-user-static binfmt-support gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-system-arm \
  qemu-efi-aarch64 dpkg-dev
image-tools:
	@missing=""; for p in $(IMAGE_TOOLS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing apt packages:$$missing"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

# The image seeds only the hash of an owner key ("owner"); the key itself stays here, beside
# the image, for the boot test and for you. A device can also get its first key from a stick.
image: venv image-tools
	@mkdir -p out/image; key=out/image/$(TARGET).api-key; \
	[ -f $$key ] || (umask 077; echo "sk-appliance-$$(head -c 32 /dev/urandom | base64 | tr -d '=+/\n')" > $$key); \
	printf 'owner %s\n' "$$(tr -d '\n' < $$key | sha256sum | cut -c1-64)" > out/image/$(TARGET).api-keys
	$(VENV)/bin/appliance-build image --target $(TARGET) --out out/image \
	  --api-keys out/image/$(TARGET).api-keys $(IMAGE_FLAGS)

# Two builds of one target from the same inputs (same time, same publisher key), compared.
image-repro: venv image-tools
	@mkdir -p out/repro && [ -f out/repro/publisher.key ] || $(VENV)/bin/appliance-build keygen --out out/repro/publisher
	@printf 'owner %s\n' "$$(printf repro | sha256sum | cut -c1-64)" > out/repro/api-keys
	for side in a b; do SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct) $(VENV)/bin/appliance-build image \
	  --target $(TARGET) --key out/repro/publisher.key --api-keys out/repro/api-keys \
	  --out out/repro/$$side || exit 1; done
	$(VENV)/bin/appliance-build image-compare out/repro/a out/repro/b

# Always rebuilds first: the image must contain the code under test. Disk targets boot under
# qemu; jetson runs its whole flow against dummy L4T packages and a fake Linux_for_Tegra.
ifeq ($(TARGET),jetson)
image-test: venv image-tools
	$(PY) -m pytest -m image -q -s tests/test_image_jetson.py
else
# the boot tests do not use the .system file: skip writing it (a minute)
image-test: IMAGE_FLAGS += --no-system-update
image-test: image
	IMAGE_TARGET=$(TARGET) $(PY) -m pytest -m image -q -s tests/test_image.py
endif

# Whole-system updates in one booted x86_64-cpu guest: a good update marked good, replays
# refused, a never-healthy update falling back by itself, a power cut during the slot write
# (about 40 minutes under TCG on 2 cores: not part of `make test`).
image-test-update: venv image-tools
	$(MAKE) image TARGET=x86_64-cpu
	$(PY) -m pytest -m image -q -s tests/test_image_update.py

clean:
	rm -rf out dist $(STATE)
