#!/usr/bin/env bash
# Measure everything BENCHMARKS.md shows and regenerate it: one command, run from the repository root.
#   benchmarks/run_all.sh            # attention sweep + model throughput + report (about 30 min on 2 cores)
#   benchmarks/run_all.sh report     # only regenerate BENCHMARKS.md from build/bench/*.json
# Heavy runs hold build/cpu.lock so that timings on a shared machine do not overlap.
set -euo pipefail
BIN=${AGENTATTN:-.venv/bin/agentattn}
mkdir -p build/bench/sections
if [[ "${1:-all}" != report ]]; then
	flock build/cpu.lock "$BIN" bench attention --compile --budget 3 --rounds 3 --case-timeout 90 \
		--mem-limit-gb 6 --json build/bench/attention.json --plot build/bench/attention.png
	flock build/cpu.lock "$BIN" bench model --img-size 224 448 --batch 8 --rounds 2 \
		--json build/bench/model.json
fi
"$BIN" bench report --output BENCHMARKS.md --figures benchmarks/figures
