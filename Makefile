# The two commands: `make demo` and `make test`. Both create .venv and install everything on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# `make demo DATA=icons`: the same flow on real images (Debian icon themes), scored by t2i eval.
demo: $(STAMP)
	$(BIN)/t2i demo $(if $(DATA),--data $(DATA) --out demo-$(DATA))

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

bench: $(STAMP)
	$(BIN)/python benchmarks/quality_shapes.py

clean:
	rm -rf $(VENV) build *.egg-info
