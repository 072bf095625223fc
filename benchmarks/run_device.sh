#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the full test suite (GPU tests included) and the
# benchmarks. Figures and logs go to $OUT (default ./runs/device).
#   bash benchmarks/run_device.sh
# Optional wheels in .whl/ (e.g. kornia, for the augmentation comparison) are installed
# into a private folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
EXTRA=""
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && EXTRA=/tmp/site
fi
export PYTHONPATH=$PWD/src${EXTRA:+:$EXTRA} PYTHONUNBUFFERED=1 BENCH_OUT=$OUT
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
# test_package checks installed metadata (the package runs from src/ here); the gloo
# multi-process tests, the docs site (mkdocs, Chromium) and the timm conversions are
# CPU-only, need tools the device lacks, and run in CI.
CPU_ONLY="tests/test_package.py tests/test_distributed.py tests/test_host_collectives.py
  tests/test_fsdp.py tests/test_accumulation.py tests/test_convert.py
  tests/test_convert_official.py tests/docs tests/examples/test_resume_distributed.py
  tests/examples/test_linear_eval_sources.py tests/test_fsdp_recipes.py
  tests/examples/test_fsdp_example.py tests/examples/test_torchvision_data.py
  tests/examples/test_arch.py tests/test_encoder_guards.py tests/test_convert_cli.py
  tests/test_convert_heads.py tests/test_convert_sources.py tests/frameworks
  tests/test_ddp_exclude.py tests/test_heads_hf.py tests/test_groups.py
  tests/examples/test_multi_node.py tests/examples/test_checkpoints.py tests/test_workflows.py"
IGNORES=$(for t in $CPU_ONLY; do printf -- '--ignore=%s ' "$t"; done)
# shellcheck disable=SC2086
$PY -m pytest -q -p no:cacheprovider $IGNORES -rs ${TESTS:-} 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
for bench in ${BENCHES:-run augment examples_end_to_end}; do
  if [ "$bench" = run ]; then  # the suite: every piece against reference-style code
    $PY benchmarks/run.py --device cuda --out "$OUT/bench-cuda.json" 2>&1
  else
    $PY "benchmarks/$bench.py" 2>&1
  fi
done | tee "$OUT/bench.log"
exit "$status"
