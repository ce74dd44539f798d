#!/usr/bin/env bash
# One command for the GPU machine: install the wheels that travel with the tree (the machine
# reaches no package registry), put this source tree on the path, run benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py arguments]    # on the GPU machine
#   bash benchmarks/gpu_check.sh --download-wheels           # here, with PyPI: fill benchmarks/wheels/
#
# The GPU machine's own python3 (torch 2.11 + CUDA 13, accelerate, transformers, peft,
# safetensors, tensorboard, tokenizers, pytest) has no `datasets` and no `deepspeed`.
# acceltrain and gpu_check need neither (acceltrain imports `datasets` only to read tables or
# Hub datasets); DeepSpeed, for the ZeRO-2 test, travels as a wheel with its missing needs.
# benchmarks/wheels/ is git-ignored: name it in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=benchmarks/wheels

if [ "${1:-}" = "--download-wheels" ]; then
  mkdir -p "$WHEELS"
  # Binary wheels for the GPU machine's CPython 3.12 on x86-64 Linux, whatever this machine is.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    hjson==3.1.0
  # DeepSpeed publishes only a source archive: build its pure-Python wheel here (no ops are
  # compiled ahead; on the GPU machine DeepSpeed would JIT-build any it needs with nvcc).
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8
  ls -l "$WHEELS"
  exit 0
fi

export PYTHONUNBUFFERED=1
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=${TMPDIR:-/tmp}/acceltrain-gpu-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check.sh: no wheels in $WHEELS (bash benchmarks/gpu_check.sh --download-wheels fills it): the DeepSpeed test will skip" >&2
fi
# The source tree, not an installed copy: acceltrain, recipes/ and tests/ as they are here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import importlib.util, torch, accelerate, transformers, acceltrain
print(f"gpu_check.sh: python {__import__('sys').version.split()[0]}, torch {torch.__version__}, accelerate "
      f"{accelerate.__version__}, transformers {transformers.__version__}, acceltrain {acceltrain.__version__} "
      f"from {acceltrain.__file__}; CUDA {torch.cuda.is_available()}; deepspeed "
      f"{'yes' if importlib.util.find_spec('deepspeed') else 'no'}; datasets "
      f"{'yes' if importlib.util.find_spec('datasets') else 'no'}", flush=True)
PYEOF
# gpu_check.py keeps its own time budget (--budget_s, default 420 s) and writes its JSON after
# every part; this backstop ends the run inside 8 minutes whatever happens.
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"
