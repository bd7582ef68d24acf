# The two commands a new user runs: `make serve` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
# torch first, from an exact spec: any other spec may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,train
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst /,_,$(subst =,_,$(TORCH_SPEC)))-$(subst $(comma),_,$(EXTRAS))
REPOSITORY ?= demo-repository
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001

.PHONY: install test lint format serve proto bench clean

install: $(STAMP)

# The client package (client/, rnnserve-client) carries the gRPC stubs the server imports.
$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ./client -e ".[$(EXTRAS)]"
	touch $@

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

serve: $(STAMP)
	$(BIN)/rnnserve serve --repository $(REPOSITORY) --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
