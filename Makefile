# qsweep developer commands. `make setup && make test` is all a fresh clone needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.14.1 torchvision==0.29.1
HOST    ?= 127.0.0.1
PORT    ?= 5000

.PHONY: setup test bench ui clean

setup: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"

$(BIN)/python:
	$(PY) -m venv $(VENV)

test:
	$(BIN)/python -m pytest -q -m "not bench"

bench:
	$(BIN)/python experiments/bench/bench_eval.py

ui:
	$(BIN)/mlflow ui --host $(HOST) --port $(PORT) --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

clean:
	rm -rf outputs multirun mlflow.db mlartifacts .pytest_cache
