# Two entry points: `make train` and `make test`. Both build and reuse .venv with a Python >= 3.12
# found by scripts/find_python.sh, installing the exact versions pinned in constraints.txt.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: train test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || { py=$$(sh scripts/find_python.sh) && echo "creating $(VENV) with $$py" && $$py -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/meshlm train --config configs/default.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests $(ARGS)

clean-venv:
	rm -rf $(VENV)
