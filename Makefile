# Everything installs from here: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install demo demo-cifar test clean

$(STAMP): Makefile pyproject.toml requirements/constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c requirements/constraints.txt -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install --no-deps crypten==0.4.1 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m deepshare_convert.torchvision_hook --install
	$(BIN)/python -m deepshare_convert.compat
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/deepshare demo

demo-cifar: install
	$(BIN)/deepshare demo cifar

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
