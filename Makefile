# Atlas: `make atlas` builds the default atlas offline, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision: these releases install from local wheels where present; any recent pair works
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

MODEL ?= efficientnet_lite0
PRESET ?= quick
DEVICE ?= auto
OUT ?= site
STORE ?= atlas-data
LAYERS ?=
DATA ?=
WEIGHTS ?=
ARGS ?=

.PHONY: install install-test atlas compare test serve clean publish
MODE ?= gh-pages

# install: what building an atlas needs; install-test adds the tests' references on top
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	# the test extra: pytest, captum, quantus 0.6.0 (the checks' reference), playwright, import-linter
	$(PY) -m pip install -q -e '.[test]'
	# the references the tests hold Atlas against, without the dependencies of their own
	# benchmarks and plots: torchray (Extremal Perturbations; not pycocotools, pymongo) and
	# horama (MACO)
	$(PY) -m pip install -q --no-deps 'torchray==1.0.0.2' 'horama==0.3.0'
	touch $@

atlas: install
	$(VENV)/bin/atlas build --model '$(MODEL)' --preset $(PRESET) --device $(DEVICE) \
		--store-dir '$(STORE)' --out '$(OUT)' \
		$(if $(LAYERS),--layers '$(LAYERS)') $(if $(DATA),--data '$(DATA)') \
		$(if $(WEIGHTS),--weights '$(WEIGHTS)') $(ARGS)
	@echo "open $(OUT)/index.html, or run: make serve"

# compare two stores built on the same images: make compare A=atlas-data/x.h5 B=atlas-data/y.h5
compare: install
	@test -n '$(A)' -a -n '$(B)' || { echo "usage: make compare A=atlas-data/x.h5 B=atlas-data/y.h5"; exit 2; }
	$(VENV)/bin/atlas compare '$(A)' '$(B)' --out '$(OUT)'

test: install-test
	$(PY) -m pytest -q

serve:
	@echo "serving $(OUT)/ at http://localhost:8000/"
	$(PY) -m http.server --directory '$(OUT)' 8000

publish: install
	$(VENV)/bin/atlas publish '$(OUT)' --mode $(MODE)
	@echo "gh-pages: git push origin gh-pages; then Settings > Pages > Deploy from a branch: gh-pages, / (root)"

clean:
	rm -rf '$(OUT)'/* '$(STORE)' .pytest_cache build *.egg-info
