#!/usr/bin/env bash
# One prepared GPU session: the CUDA tests, then `agentattn bench gpu` (path checks + timings vs FlashAttention).
#   OUT=out_dir benchmarks/gpu_check.sh
# Runs from a source checkout with the machine's own torch/triton/timm (PYTHONPATH=src, nothing installed).
set -uo pipefail
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/ops/test_triton_agent.py tests/ops/test_sdpa_training_path.py \
	-k "cuda or CUDA or bf16" -rs 2>&1 | tail -15
timeout 420 $PY -m agentattn.cli.main bench gpu --json "$OUT/gpu.json" --section "$OUT/gpu_section.json" \
	2>&1 | tee "$OUT/gpu.log"
