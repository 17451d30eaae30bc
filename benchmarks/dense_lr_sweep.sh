#!/usr/bin/env bash
# GPU sweep of `agentattn dense train` settings at a fixed step count: the steps the default CPU run reaches in
# its 15-minute budget (about 1 s per step on 2 cores), so that the CPU default can be chosen in minutes.
#   (on a CUDA machine, with a pycocotools wheel in .whl/) STEPS=800 benchmarks/dense_lr_sweep.sh
# Output of the run that chose the default lr: benchmarks/results/dense-lr-sweep-h200.txt
set -uo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then  # wheels the machine lacks (pycocotools), carried along
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
S=${STEPS:-600}
run() {  # name, steps, args...
	local name=$1 steps=$2; shift 2
	python3 -m agentattn.cli.main dense train --device cuda --max-steps "$steps" --time-limit-min 0 --threads 2 \
		--no-progress --output /tmp/dense_$name "$@" > /tmp/$name.log 2>&1
	echo "== $name: $(python3 -c "import json; m=json.load(open('/tmp/dense_$name/final.json'))['metrics']; print({k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()})" 2>&1 | tail -1)"
	tail -3 /tmp/$name.log | head -2
}
run base "$S" &
run lr1e3 "$S" --lr 1e-3 &
run lr6e4 "$S" --lr 6e-4 &
run lr2e3 "$S" --lr 2e-3 --warmup-steps 100 &
run b8_lr1e3 $((S / 2)) --batch-size 8 --lr 1e-3 &
run softmax_lr1e3 "$S" --lr 1e-3 --backbone-kwargs attn_type=BBBB &
wait
