#!/bin/bash
# The SmolLM2 measurements of the dynamic routers (issue 4), on the demo run `runs/smollm2`
# (`make demo` first). Run from anywhere; outputs go to bench_out/ (ignored by git); the JSON and
# report of the last run were copied into this folder.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=2 PYTHONPATH=src
PY=.venv/bin/python
R=runs/smollm2
OUT=${OUT:-bench_out/dyn}
mkdir -p bench_out
date -u
$PY benchmarks/dynamic_vs_static.py $R --out $OUT --targets 0.6,0.7,0.85,1.0 --steps 20 --direct-steps 0 --route-every ${ROUTE_EVERY:-3} \
    --train-blocks 10 --blocks-per-domain 8 --timed-blocks 2 --repeats 5 --calibrate-blocks 10 -q > $OUT.log 2>&1
date -u
$PY benchmarks/router_overhead.py $R --dynamic-dir $OUT/dynamic --out $OUT --target 0.7 --repeats 20 > $OUT.overhead.log 2>&1
date -u
