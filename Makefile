# flextron: `make demo` runs the whole conversion on the embedded SmolLM2 model, `make test` runs
# the tests. Both create .venv (python3 -m venv) and install the package with its dev extras;
# the install is redone only when pyproject.toml changes (stamp file).

PYTHON ?= python3
VENV   ?= .venv
CONFIG ?= configs/smollm2.yaml
STAMP  := $(VENV)/.flextron-installed

.PHONY: demo test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flextron run $(CONFIG)
	@echo "report: $$($(VENV)/bin/python -c 'import sys; from flextron.config import load_config; print(load_config(sys.argv[1]).run_dir / "report.md")' $(CONFIG))"

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
