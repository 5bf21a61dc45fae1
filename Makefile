# Two entry points: `make train` and `make test`. Both build and reuse .venv with a Python >= 3.12
# found by scripts/find_python.sh, installing the exact versions pinned in constraints.txt with the
# JAX accelerator extra this machine needs (cpu, cuda12, cuda13 or tpu: meshlm.accelerators picks
# it from nvidia-smi and the TPU runtime; MESHLM_ACCEL=cpu|cuda12|cuda13|tpu overrides it).
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=
# The Python that runs the selection (standard library only): the venv's, else the one found.
PROBE_PY := $(shell test -x $(PY) && echo $(PY) || sh scripts/find_python.sh)
ACCEL  := $(if $(PROBE_PY),$(shell MESHLM_ACCEL='$(MESHLM_ACCEL)' PYTHONPATH=src $(PROBE_PY) -m meshlm.accelerators 2>&1))
ifneq ($(filter cpu cuda12 cuda13 tpu,$(ACCEL)),$(or $(ACCEL),none))
$(error $(or $(ACCEL),no accelerator extra picked))
endif
comma  := ,
EXTRAS := test$(if $(filter-out cpu,$(ACCEL)),$(comma)$(ACCEL))
# One stamp per extra: choosing another one reinstalls.
STAMP  := $(VENV)/.installed-$(ACCEL)

.PHONY: train test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || { py=$$(sh scripts/find_python.sh) && echo "creating $(VENV) with $$py" && $$py -m venv $(VENV); }
	@echo "installing meshlm[$(EXTRAS)] for $$(MESHLM_ACCEL='$(MESHLM_ACCEL)' PYTHONPATH=src $(PY) -m meshlm.accelerators --why)"
	$(PY) -m pip install -q --upgrade pip
	@rm -f $(VENV)/.installed-*
	$(PY) -m pip uninstall -q -y $$(PYTHONPATH=src $(PY) -m meshlm.accelerators --foreign $(ACCEL)) 2>/dev/null || true
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/meshlm train --config configs/default.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests $(ARGS)

clean-venv:
	rm -rf $(VENV)
