#!/bin/bash
# SmolLM2 measurements of issue 4 (run after /work/notes/DEMO_DONE exists). Outputs under bench_out/ (not committed).
cd /work/wt4
export OMP_NUM_THREADS=2 PYTHONPATH=/work/wt4/src
PY=/work/main/.venv/bin/python
R=/work/main/runs/smollm2
OUT=bench_out/dyn
date -u
/usr/bin/time -v $PY benchmarks/dynamic_vs_static.py $R --out $OUT --targets 0.6,0.7,0.85,1.0 --steps 20 --direct-steps 6 \
    --train-blocks 10 --blocks-per-domain 8 --timed-blocks 2 --repeats 3 --calibrate-blocks 10 -q > $OUT.log 2>&1
date -u
$PY benchmarks/router_overhead.py $R --dynamic-dir $OUT/dynamic --out $OUT --target 0.7 --repeats 10 > $OUT.overhead.log 2>&1
date -u
