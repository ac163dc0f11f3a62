# Every target sets up the environment on a fresh machine first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Offline by default (nothing is downloaded at run time); `make train HF_HUB_OFFLINE=0 ARGS=...` for hub.push_at_end.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train train-ep2 test test-fake-cuda check lint bench bench-setup gpu-check clean

setup: $(STAMP)

# torch first: pip resolving plain `torch` pulls a multi-GB CUDA build. Where a torch is already
# importable (GPU machines), the venv sees it through --system-site-packages and none is installed.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@# DeepSpeed compiles a comm op on first start (~100 s on 2 cores); do it once here, not in a test.
	$(PY) -c "from moe_lm.parallel.deepspeed_backend import warm_deepspeed_ops; warm_deepspeed_ops()"
	@touch $@

# glibc returns large freed blocks to the OS on every free; training re-allocates the same sizes
# each step, so keep them. Worth -11% step time while the loss still built the whole [tokens, vocab]
# logits; since the loss is chunked, within noise at the tiny and bench_train sizes (3,724-3,748 vs
# 3,685-3,867 tokens/s), so `accelerate launch` without it trains as fast.
TRAIN_ENV := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456

# `moe-lm launch` is `accelerate launch` (same options) that keeps bad input to one `error:` line
# and exit code 2 (docs/launching.md); make then adds its own `make: *** [...] Error 2`.
train: setup
	@$(TRAIN_ENV) $(PY) -m moe_lm launch --config_file configs/accelerate/cpu-1proc.yaml --num_cpu_threads_per_process $(shell nproc) \
	  train configs/tiny-shakespeare.yaml train.overwrite=true $(ARGS)

# Two CPU processes, experts split across them (EP=2): the multi-process path on one machine.
train-ep2: setup
	@$(TRAIN_ENV) $(PY) -m moe_lm launch --config_file configs/accelerate/cpu-2proc.yaml --num_cpu_threads_per_process 1 \
	  train configs/tiny-shakespeare.yaml parallel.ep_size=2 \
	  train.output_dir=runs/tiny-shakespeare-ep2 train.overwrite=true $(ARGS)

# pytest's exit 5 (no tests collected) is a failure too: a suite that ran nothing proved nothing.
test: setup
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$rc

# The forward half of the GPU code path on fake CUDA tensors (tests/fake_cuda; docs/gpu.md): it needs a
# CUDA build of torch, which the CPU venv has not. A second venv holds only that torch (2.14.1, about
# 5.4 GB with the nvidia-* packages) and reads every other package, and moe_lm, from the CPU venv, so
# `make train` and `make test` install nothing more.
CUDA_VENV := .venv-cuda
$(CUDA_VENV)/.installed: $(STAMP)
	python3 -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q torch==2.14.1
	$(PY) -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" > \
	  "$$($(CUDA_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/moe_lm_cpu_venv.pth"
	@touch $@

test-fake-cuda: $(CUDA_VENV)/.installed
	PYTHONPATH=$(CURDIR) $(CUDA_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/fake_cuda

# lint-imports checks the layering in pyproject.toml ([tool.importlinter]): no upward imports, no cycles.
lint: setup
	$(VENV)/bin/ruff check moe_lm tests scripts
	$(VENV)/bin/ruff format --check moe_lm tests scripts
	$(VENV)/bin/mypy moe_lm
	$(VENV)/bin/lint-imports

check: lint test

# Optional: the other frameworks bench_peers.py compares against (it skips any that is missing).
bench-setup: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m pip install -q --no-deps torchtitan==0.3.0 ai2-olmo-core==3.0.0

bench: setup
	$(PY) scripts/bench_peers.py
	$(PY) scripts/bench_moe_layer.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_scaling.py
	$(PY) scripts/bench_data.py
	$(PY) scripts/bench_balance.py
	$(PY) scripts/bench_routing_metrics.py

# GPU readiness in one table (budgeted at 8 minutes on one GPU): tests/gpu, configs/gpu-check.yaml trained
# in bf16 with eval, checkpoint, resume and export, bench_train.py with and without --compile.
# `python scripts/gpu_check.py --device cpu --smoke` runs the same logic on a CPU in seconds.
gpu-check: setup
	$(PY) scripts/gpu_check.py --device cuda $(ARGS)

clean:
	rm -rf $(VENV) $(CUDA_VENV) runs .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
