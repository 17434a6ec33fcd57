#!/usr/bin/env bash
# Gate a candidate target against the shipped one (benchmarks/results/target_eval.json) on the same held-out clips,
# in about 20 minutes on 2 CPU cores: 200 clips at 512, 1536 and 3072 visual tokens, where the goal is set, and a
# few beyond the training lengths (50 at 8192, 5 at 25088), where a change of positions can break a target that
# gains below 3k (stage 2e: +0.024 up to 3k tokens, -0.19 at 25k). Two processes of one thread each; then
# scripts/compare_gate.py prints the clip-by-clip differences. Run from the repository root:
#   bash scripts/gate_target.sh CANDIDATE_DIR OUT     # writes OUT_a.json and OUT_b.json (rerun: resumes)
set -euo pipefail
{  # read whole before running, as build_embedded.sh is
PY=${PY:-.venv/bin/python}
SPARROW=${SPARROW:-.venv/bin/sparrow}
if [ $# -ne 2 ]; then
  echo "gate_target.sh: give the candidate target's directory and an output prefix: bash scripts/gate_target.sh" \
    "runs/exp/stage2e_export runs/exp/stage2e_gate" >&2
  exit 2
fi
CAND=$1
OUT=$2
if [ ! -f "$CAND/config.json" ]; then
  echo "gate_target.sh: $CAND has no config.json; give a target directory (train-target --export writes one)" >&2
  exit 2
fi
mkdir -p "$(dirname "$OUT")"
wait_all() { local pid rc=0; for pid in $(jobs -p); do wait "$pid" || rc=$?; done; return "$rc"; }
E=(evaluate-target --target "$CAND" --blank-clips 0 --resume)
OMP_NUM_THREADS=1 $SPARROW "${E[@]}" --buckets 512,1536,8192 --clips 200,200,50 --long-buckets "" --out "${OUT}_a" &
OMP_NUM_THREADS=1 $SPARROW "${E[@]}" --buckets 3072 --clips 200 --long-buckets 25088 --long-clips 5 --out "${OUT}_b" &
wait_all
$PY scripts/compare_gate.py "${OUT}_a.json" "${OUT}_b.json"
exit
}
