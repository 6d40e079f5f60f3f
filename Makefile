# fogfl — `make demo` and `make test` work on a fresh clone: they create .venv and install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench tables lint protos clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to 2.13.0 (the CPU wheel); a loose range would pull a CUDA build.
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	# modAL-python 0.4.2.1 pins an old skorch it never imports: install its code only.
	$(BIN)/python -m pip install -q --no-deps modAL-python==0.4.2.1
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fogfl run $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m deploy.bench $(ARGS)

# regenerate the attack tables in docs/ (about 25 minutes on 2 cores)
tables: setup
	$(BIN)/python -m deploy.bench.bench_analytic_table --write-docs
	$(BIN)/python -m deploy.bench --only attacks

lint: setup
	$(BIN)/ruff check .

protos: setup
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/fogfl.proto

clean:
	rm -rf $(VENV) runs .pytest_cache
