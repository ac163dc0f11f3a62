# Every target sets up the environment on a fresh machine first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train test check lint bench clean

setup: $(STAMP)

# torch first: pip resolving plain `torch` pulls a multi-GB CUDA build. Where a torch is already
# importable (GPU machines), the venv sees it through --system-site-packages and none is installed.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

train: setup
	$(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu-1proc.yaml \
	  -m moe_lm.cli train configs/tiny-shakespeare.yaml train.overwrite=true $(ARGS)

test: setup
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check moe_lm tests scripts
	$(VENV)/bin/ruff format --check moe_lm tests scripts
	$(VENV)/bin/mypy moe_lm

check: lint test

bench: setup
	$(PY) scripts/bench_moe_layer.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_scaling.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
