# shimmy — `make install` then `make test`. See README.md.
PYTHON ?= python3
VENV ?= .venv
GPU ?= cpu
LLAMA_CPP_VERSION ?= 0.3.36
BIN := $(VENV)/bin
CHROMIUM ?= /usr/bin/chromium

# Only the llama/ggml shared libraries are needed: the Python package drives llama.cpp
# through ctypes, so its CLI tools, examples, tests, server and the multimodal (mtmd)
# library are skipped. This roughly halves the build on a 2-core machine.
CMAKE_COMMON := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
CMAKE_GPU_cpu :=
CMAKE_GPU_cuda := -DGGML_CUDA=ON
CMAKE_GPU_metal := -DGGML_METAL=ON
CMAKE_GPU_vulkan := -DGGML_VULKAN=ON
ifeq ($(filter $(GPU),cpu cuda metal vulkan),)
$(error GPU must be one of cpu, cuda, metal, vulkan (got '$(GPU)'))
endif

# llama.cpp's AMX kernels (Intel Xeon 4th gen and later) crash the first decode of Q4_K
# models such as the starter model: ggml-org/llama.cpp#20824, open and unfixed. A native
# build enables them wherever the CPU has AMX, so on x86-64 both builds leave them out; GCC
# and Clang let an explicit -mno-* win over -march=native. The AVX-512 kernels remain.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
# Bumped whenever the build flags change, so a cached build made with the old ones is not reused.
BUILD_RECIPE := 2

# The built wheel is kept per version and GPU variant, so re-running `make install`
# (or a fresh clone on the same machine) does not rebuild llama.cpp.
WHEEL_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/shimmy/wheels/$(LLAMA_CPP_VERSION)-$(GPU)-r$(BUILD_RECIPE)
# llama.cpp's own server, the bench's second peer: built from the vendor/llama.cpp of the same
# llama-cpp-python sdist (so both peers and shimmy run the same llama.cpp), with the same GPU
# flags as the wheel, and cached next to it. Only `make bench` builds it, never install/test.
LLAMA_SERVER_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/shimmy/llama-server/$(LLAMA_CPP_VERSION)-$(GPU)-r$(BUILD_RECIPE)
LLAMA_SERVER ?= $(LLAMA_SERVER_CACHE)/llama-server
# The server and nothing else: no tests, examples, HTTPS or web UI (no download at build
# time: only the package registry is reachable), and a static build so the cached binary
# needs none of the build tree's shared libraries.
CMAKE_SERVER := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF \
	-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
NPROC := $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)

.PHONY: install llama-cpp llama-server browser test test-fast lint format serve bench bench-versus clean llamacpp-suite

install: $(BIN)/python llama-cpp browser
	$(BIN)/pip install -q -e '.[dev,bench,starter]'
	$(BIN)/python -m shimmy.models.starter
	@echo "shimmy installed: run 'make test', then 'make serve'"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

llama-cpp: $(BIN)/python
	@if ! ls $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "Building llama-cpp-python $(LLAMA_CPP_VERSION) for $(GPU) (once; about 6 min on 2 cores)"; \
		mkdir -p $(WHEEL_CACHE); \
		CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" \
		CMAKE_ARGS="$(CMAKE_COMMON) $(CMAKE_GPU_$(GPU)) $(CMAKE_EXTRA)" \
		$(BIN)/pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
			-w $(WHEEL_CACHE) llama-cpp-python==$(LLAMA_CPP_VERSION); \
	fi
	$(BIN)/pip install -q --force-reinstall --no-deps $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(BIN)/pip install -q 'typing-extensions>=4.5.0' 'numpy>=1.20.0' 'diskcache>=5.6.1' 'jinja2>=2.11.3'

# The web page's tests drive Debian's Chromium (never a browser downloaded by a test tool).
# As root with apt-get (CI, containers) it is installed here; elsewhere those tests are
# skipped with a note, unless CI=true, where a missing browser fails them.
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's chromium for the web page's tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
		|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q --no-install-recommends chromium >/dev/null; }; \
	else \
		echo "note: no $(CHROMIUM); the browser tests will be skipped (apt install chromium)"; \
	fi

test:
	$(BIN)/pytest -q

test-fast:
	$(BIN)/pytest -q -m 'not starter'

lint:
	$(BIN)/ruff check shimmy tests bench
	$(BIN)/ruff format --check shimmy tests bench
	$(BIN)/mypy shimmy

format:
	$(BIN)/ruff format shimmy tests bench
	$(BIN)/ruff check --fix shimmy tests bench

serve:
	$(BIN)/shimmy serve

# llama.cpp's own server tests, first against llama-server itself (the baseline), then against
# shimmy, judged by what llama-server passed (slow; fetches the llama-cpp-python sdist once).
# SUITE=path/to/tools/server/tests uses that copy; FILES=test_completion.py picks files.
SUITE_OUT := bench/llamacpp_suite/out
llamacpp-suite: llama-server
	@mkdir -p $(SUITE_OUT)
	$(BIN)/python bench/llamacpp_suite/run.py $(if $(SUITE),--suite $(SUITE)) $(FILES) \
		--llama-server $(LLAMA_SERVER) --json $(SUITE_OUT)/llama-server.json
	$(BIN)/python bench/llamacpp_suite/run.py $(if $(SUITE),--suite $(SUITE)) $(FILES) \
		--baseline $(SUITE_OUT)/llama-server.json --json $(SUITE_OUT)/shimmy.json

bench: llama-server
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/versus.py --llama-server $(LLAMA_SERVER)

# Only the comparison with llama.cpp's server and llama-cpp-python's (bench/versus.py).
bench-versus: llama-server
	$(BIN)/python bench/versus.py --llama-server $(LLAMA_SERVER)

llama-server: $(LLAMA_SERVER)

# The sdist is fetched with pip (the package registry is the only source needed), unpacked
# and built in a scratch folder that is removed afterwards; only the binary is kept.
$(LLAMA_SERVER): | $(BIN)/python
	@echo "Building llama.cpp's llama-server from llama-cpp-python $(LLAMA_CPP_VERSION) for $(GPU) (once)"
	@set -e; scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	$(BIN)/pip download -q --no-deps --no-binary :all: -d "$$scratch" \
		llama-cpp-python==$(LLAMA_CPP_VERSION); \
	tar -xzf "$$scratch"/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C "$$scratch"; \
	src="$$scratch/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp"; \
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" \
	cmake -S "$$src" -B "$$scratch/build" $(CMAKE_SERVER) $(CMAKE_GPU_$(GPU)) $(CMAKE_EXTRA) >/dev/null; \
	cmake --build "$$scratch/build" --target llama-server -j $(NPROC); \
	mkdir -p $(LLAMA_SERVER_CACHE); \
	cp "$$scratch/build/bin/llama-server" $(LLAMA_SERVER).tmp; \
	mv $(LLAMA_SERVER).tmp $(LLAMA_SERVER)
	@echo "llama-server cached at $(LLAMA_SERVER)"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
