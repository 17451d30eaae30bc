#!/usr/bin/env bash
# One prepared GPU session (under ten minutes on one H100/H200): the CUDA tests of the fused kernels (forward and
# backward, against float64), then `agentattn bench gpu` (path checks + op and layer timings vs FlashAttention,
# forward and forward+backward, with the speed goals), then whole-model throughput timm-style (bf16 autocast,
# channels-last) for every agent backend against the official code's math and the softmax counterparts.
#   OUT=out_dir benchmarks/gpu_check.sh
# Runs from a source checkout with the machine's own torch/triton/timm (PYTHONPATH=src, nothing installed).
# Afterwards: copy $OUT/gpu.json to benchmarks/results/gpu-<card>.json, $OUT/gpu_section.json and
# $OUT/model_section.json to benchmarks/results/sections/, and run `benchmarks/run_all.sh report`.
set -uo pipefail
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/ops/test_triton_agent.py tests/ops/test_triton_agent_training.py \
	tests/ops/test_sdpa_training_path.py -k "cuda or CUDA or bf16" -rs 2>&1 | tail -15
timeout 200 $PY -m agentattn.cli.main bench gpu --json "$OUT/gpu.json" --section "$OUT/gpu_section.json" \
	2>&1 | tee "$OUT/gpu.log"
# Agent-DeiT-T/S, Agent-PVT-T, Agent-Swin-T, Agent-CSwin-T; batch 256 at 224 and 64 at 448.
timeout 230 $PY -m agentattn.cli.main bench model --device cuda --amp bf16 --channels-last \
	--backends auto triton matmul --softmax-twins --img-size 224 448 --batch 256 64 --warmup 2 --rounds 5 \
	--step-timeout 20 --json "$OUT/model.json" --section "$OUT/model_section.json" \
	agent_deit_tiny_patch16_224 deit_tiny_patch16_224 agent_deit_small_patch16_224 deit_small_patch16_224 \
	agent_pvt_tiny_224 agent_swin_tiny_224 swin_tiny_patch4_window7_224 agent_cswin_tiny_224 \
	2>&1 | tee "$OUT/model.log"
