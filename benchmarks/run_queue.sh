#!/usr/bin/env bash
# Train benchmark configs two at a time (one thread each):
#   bash benchmarks/run_queue.sh aspirin_e2ip aspirin_plain ...
# Each run writes benchmarks/runs/NAME/ (model.pt, metrics.json, metrics.csv, plots) and NAME.log.
set -u
cd "$(dirname "$0")/.."
mkdir -p benchmarks/runs
printf '%s\n' "$@" | xargs -P "${JOBS:-2}" -I{} sh -c \
  'e2ip train benchmarks/configs/{}.yaml --out benchmarks/runs/{} --set training.num_threads=1 > benchmarks/runs/{}.log 2>&1; echo "{} exit $?"'
