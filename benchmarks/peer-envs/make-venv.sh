#!/usr/bin/env bash
# Make a peer's virtual environment for `sdedge bench` (benchmarks/peer-envs/README.md):
#
#   bash benchmarks/peer-envs/make-venv.sh optimum-onnxruntime /work/peers/optimum-onnx
#   bash benchmarks/peer-envs/make-venv.sh optimum-openvino    /work/peers/optimum-intel
#
# Installs the peer's pinned requirements (benchmarks/peer-envs/<kind>.txt; torch is the CPU build) and sdedge
# itself with --no-deps, so the bench can start its worker there (python -m sdedge.benchmarks.workers).
set -euo pipefail
kind=${1:?usage: make-venv.sh KIND DIR (KIND: optimum-onnxruntime or optimum-openvino)}
dir=${2:?usage: make-venv.sh KIND DIR}
here=$(cd "$(dirname "$0")" && pwd)
reqs="$here/$kind.txt"
if [ ! -f "$reqs" ]; then
  echo "make-venv.sh: unknown peer kind '$kind' (no $reqs)" >&2
  exit 2
fi
python3 -m venv "$dir"
"$dir/bin/pip" install -q --upgrade pip
"$dir/bin/pip" install -q -r "$reqs"
if [ "$kind" = optimum-openvino ]; then
  # optimum-intel requires torchvision, whose PyPI build does not match the CPU torch build
  # ("operator torchvision::nms does not exist" on `import transformers.modeling_utils`); nothing here uses it.
  "$dir/bin/pip" uninstall -q -y torchvision
fi
"$dir/bin/pip" install -q --no-deps -e "$here/../.."
"$dir/bin/python" -c "import sdedge.benchmarks.workers, optimum" && echo "peer venv ready: $dir/bin/python"
