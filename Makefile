# Two commands set up everything on a fresh machine with Python 3.11:
#   make demo   -- train a tiny LoRA on the built-in demo data
#   make test   -- run the test suite
# Both create .venv when it is missing or when requirements.txt / TORCH_SPEC changed.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Leave empty for the default index; e.g. https://download.pytorch.org/whl/cu128 for another CUDA build.
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

# The stamp records what the venv was built from; a change in either input rebuilds it.
STAMP_ID := $(shell cat requirements.txt setup.py 2>/dev/null | cksum | cut -d' ' -f1)-$(shell echo '$(TORCH_SPEC) $(TORCH_INDEX_URL)' | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(STAMP_ID)

.PHONY: venv test demo clean-venv

venv: $(STAMP)

$(STAMP):
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

test: venv
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(VPY) examples/demo.py

clean-venv:
	rm -rf $(VENV)
