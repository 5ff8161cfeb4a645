#!/usr/bin/env bash
# The prepared GPU check: one short script for a CUDA machine lent for minutes.
#
#   bash benchmarks/gpu_check.sh            # on a machine with torch (CUDA), transformers, peft
#
# 1. The machine: GPU, driver, library versions.
# 2. The test suite with CUDA visible: Accelerate then places every trainer-level test's policy,
#    batches and losses on cuda:0, so the suite checks device placement end to end (the vLLM
#    backend's tests need vllm, which such a machine may lack: they skip and say so).
# 3. Step times of the hour recipe on SmolLM2-135M's architecture, plain and full-critique
#    (benchmarks/part_costs.py: warm-up step, GRPO step split into generation, reward,
#    reference and update, evaluation). Where the model's weights cannot travel (the GGUF is
#    98 MB), the folder in $DEEPSYNAPSE_CACHE holds SmolLM2's config and tokenizer and this
#    script fills it with random weights: the same shapes and kernels, every completion runs
#    to max_new_tokens (the slowest case); the rewards are all zero.
#
# Wheels under .whl/ (pure Python, e.g. the peft/accelerate versions the CPU suite runs) are
# installed first into /tmp/site; .gpu/cache, when present, is the model cache. Logs and
# results go to $OUT (the device tool's folder) or runs/gpu-check. Preparing both here, once
# (both git-ignored through .git/info/exclude; after `make setup`, which converts the GGUF):
#   echo /.whl/ >>.git/info/exclude; echo /.gpu/ >>.git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     peft==0.21.2 accelerate==1.16.0 gguf==0.19.0
#   m=.gpu/cache/models/smollm2-135m-instruct; mkdir -p $m
#   cp ~/.cache/deepsynapse/models/smollm2-135m-instruct/{*.json,*.jinja} $m/
# then, through the device tool: run(command="SUITE_S=180 STEPS_S=170 bash
# benchmarks/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=420).
set -u -o pipefail
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SUITE_S=${SUITE_S:-240}
STEPS_S=${STEPS_S:-240}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .gpu/cache ]; then export DEEPSYNAPSE_CACHE=${DEEPSYNAPSE_CACHE:-$PWD/.gpu/cache}; fi

echo "== 1. machine"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  $PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported()); print('transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

$PY - <<'EOF' 2>&1 | tee -a "$OUT/machine.txt"
# Random weights into a model folder that holds SmolLM2's config and tokenizer but no weights.
import os
from pathlib import Path

folder = Path(os.environ.get("DEEPSYNAPSE_CACHE", "~/.cache/deepsynapse")).expanduser()
folder = folder / "models" / "smollm2-135m-instruct"
if (folder / "config.json").is_file() and not (folder / "model.safetensors").is_file():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(folder)
    print("smollm2-135m-instruct: random weights (the GGUF did not travel)")
EOF

echo "== 2. test suite, CUDA visible"
timeout "$SUITE_S" $PY -m pytest -p no:cacheprovider -n 8 -q -rfE --timeout 120 \
  --ignore=tests/rollout/test_vllm_backend.py tests >"$OUT/pytest.log" 2>&1
echo "suite exit $? (124: over ${SUITE_S}s)"
tail -n 60 "$OUT/pytest.log"

echo "== 3. step times, SmolLM2 architecture, hour recipe"
timeout "$STEPS_S" $PY benchmarks/part_costs.py --configs plain full-critique \
  --sft-steps 3 --grpo-steps 4 --eval-limit 64 --results "$OUT/part-costs-gpu" \
  >"$OUT/part-costs.log" 2>&1
echo "part_costs exit $?"
tail -n 40 "$OUT/part-costs.log"
cat "$OUT/part-costs-gpu.md" 2>/dev/null
