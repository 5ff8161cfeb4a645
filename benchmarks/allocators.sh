#!/bin/bash
# DeepSynapse's plain GRPO step (benchmarks/vs_trl.py reference settings, SmolLM2) under each
# C allocator, one after another: step, update, minor faults, kernel time, peak RSS.
#   bash benchmarks/allocators.sh                       # all variants, 3 steps each
#   VARIANTS="glibc tcmalloc" STEPS=4 bash benchmarks/allocators.sh
#   taskset -c 0 bash benchmarks/allocators.sh          # on one core
# jemalloc and mimalloc are looked up where Debian and PyPI's cmeel-mimalloc put them.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LIB=/usr/lib/x86_64-linux-gnu
MIMALLOC=$($PY -c "import sys, glob; print((glob.glob(sys.prefix + '/lib/python3*/site-packages/cmeel.prefix/lib/libmimalloc.so.*') + [''])[0])")
declare -A ENVS=(
  [glibc]="DEEPSYNAPSE_ALLOCATOR=glibc"
  [glibc-notrim]="DEEPSYNAPSE_ALLOCATOR=glibc"
  [glibc-keep]="DEEPSYNAPSE_ALLOCATOR=glibc MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736"
  [tcmalloc]="DEEPSYNAPSE_ALLOCATOR=tcmalloc"
  [jemalloc]="LD_PRELOAD=$LIB/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:10000,muzzy_decay_ms:10000"
  [mimalloc]="LD_PRELOAD=$MIMALLOC"
)
declare -A SETS=(
  [glibc-notrim]="--deepsynapse-set train.trim_memory=false"
  [glibc-keep]="--deepsynapse-set train.trim_memory=false"
)
OUT=${OUT:-/tmp/allocators}
mkdir -p "$OUT"
for v in ${VARIANTS:-glibc glibc-notrim glibc-keep tcmalloc jemalloc mimalloc}; do
  env ${ENVS[$v]} /usr/bin/time -o "$OUT/$v.time" \
    -f "%e s wall, %R minor faults, %S s kernel, %U s user, %M KB max RSS" \
    $PY benchmarks/vs_trl.py --only deepsynapse --repeats 1 --steps "${STEPS:-3}" \
    ${SETS[$v]:-} --out "$OUT/$v.json" > "$OUT/$v.log" 2>&1 || { echo "$v: failed ($OUT/$v.log)"; continue; }
  $PY - "$v" "$OUT" <<'PY'
import json, sys
v, out = sys.argv[1], sys.argv[2]
run = [r for r in json.load(open(f"{out}/{v}.json"))["runs"] if r["trainer"] == "deepsynapse"][0]
steps = " / ".join(f"{s['wall_s']:.1f}" for s in run["steps"])
update = " / ".join(f"{s['timing'].get('timing/update', 0):.1f}" for s in run["steps"])
print(f"{v:13s} {run.get('allocator', '?'):9s} steps {steps} s | update {update} s | "
      + open(f"{out}/{v}.time").read().strip().splitlines()[-1])
PY
done
