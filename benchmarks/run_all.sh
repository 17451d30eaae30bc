#!/usr/bin/env bash
# Measure what BENCHMARKS.md shows and regenerate it: one command, run from the repository root.
#   benchmarks/run_all.sh              # attention sweep + model throughput + report (about 30 min on 2 cores)
#   benchmarks/run_all.sh attention    # only the attention sweep and its 20-round DeiT-T run, then the report
#   benchmarks/run_all.sh model        # only the model throughput, then the report
#   benchmarks/run_all.sh report       # only regenerate BENCHMARKS.md from benchmarks/results/*.json
# The measured JSON lands in benchmarks/results/ and is committed with BENCHMARKS.md. Sections measured elsewhere
# (the GPU run of benchmarks/gpu_check.sh, `agentattn bench sd`, ...) are JSON files in benchmarks/results/sections/.
# Heavy runs hold build/cpu.lock so that timings on a shared machine do not overlap.
set -euo pipefail
BIN=${AGENTATTN:-.venv/bin/agentattn}
PART=${1:-all}
RESULTS=benchmarks/results
mkdir -p build "$RESULTS/sections"
if [[ "$PART" == all || "$PART" == attention ]]; then
	flock build/cpu.lock "$BIN" bench attention --compile --budget 5 --rounds 5 --case-timeout 90 \
		--mem-limit-gb 6 --json "$RESULTS/attention.json"
	# The DeiT-T goal config alone, agentattn against the official code, in 20 paired rounds (a report section).
	flock build/cpu.lock "$BIN" bench attention --tokens 197 --cases agentattn official --budget 20 --rounds 20 \
		--skip-op --section "$RESULTS/sections/attention-deit.json"
fi
if [[ "$PART" == all || "$PART" == model ]]; then
	flock build/cpu.lock "$BIN" bench model --img-size 224 448 --batch 8 --rounds 2 --json "$RESULTS/model.json"
fi
"$BIN" bench report --output BENCHMARKS.md --figures benchmarks/figures
