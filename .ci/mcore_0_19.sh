#!/usr/bin/env bash
# The megatron-core 0.19.2 leg: megarope's unit and distributed tests against the version the GPU
# machines run (Python 3.12 + torch 2.11 there), on this CI's Python 3.11 + torch 2.13 CPU.
#
# pip will not install 0.19.2 here (it requires Python >= 3.12), but all of its Python files
# compile on 3.11 and its one compiled part (megatron/core/datasets/helpers_cpp, a cp312 module)
# is a dataset helper megarope never imports. So the wheel is downloaded for 3.12, unpacked into a
# folder put ahead of site-packages on PYTHONPATH, next to triton (0.19.2 imports it
# unconditionally). Nothing is installed into the environment: the main leg keeps 0.16.1.
#
# Usage: .ci/mcore_0_19.sh [pytest args]   (default: tests/unit tests/distributed)
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${MEGAROPE_MCORE_0_19_DIR:-${TMPDIR:-/tmp}/megarope-mcore-0.19.2}
if [ ! -f "$dir/ready" ]; then
  rm -rf "$dir"
  mkdir -p "$dir/wheels" "$dir/site"
  python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: megatron-core==0.19.2 -d "$dir/wheels"
  python3 -m pip install -q --no-deps --target "$dir/site" -c .ci/constraints.txt triton
  python3 -m zipfile -e "$dir"/wheels/megatron_core-0.19.2-*.whl "$dir/site"
  touch "$dir/ready"
fi
export PYTHONPATH="$dir/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import megatron.core as m; assert m.__version__ == '0.19.2', m.__version__; print('megatron-core', m.__version__, 'from', m.__file__)"
if [ $# -eq 0 ]; then set -- tests/unit tests/distributed; fi
python3 -m pytest -q "$@"
