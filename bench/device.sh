#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a lent GPU machine (issue 16, item 5: the async save's
# blocked time against a full save, with pinned staging buffers):
#   1. the tests that run on a GPU (tests/test_async_save.py: load into GPU shards, two async saves
#      and a plain one, each checked against the weights of its moment);
#   2. python -m bench.run --device cuda, 300m and 1b, W = 1 (that machine has one GPU).
# Run from the repository root. Nothing can be downloaded there, so the packages it lacks travel as
# wheels in .whl/: `make device-wheels` here, then name `.whl` in the device tool's `carry`:
#   run(command="bash bench/device.sh", carry=[".whl"], timeout_s=540)
# What it writes goes to $OUT (the folder the device tool brings back), else bench/work/device/.
# BENCH_DEVICE=cpu rehearses the same steps on a machine without a GPU (tests/test_bench_smoke.py does);
# SIZES, REPS, WORK (base models and outputs, default bench/work) and WHEELS (default .whl) change it.
set -uo pipefail

out=${OUT:-bench/work/device}
device=${BENCH_DEVICE:-cuda}
python=${PYTHON:-python3}
work=${WORK:-bench/work}
wheels=${WHEELS:-.whl}
mkdir -p "$out"

if compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl || exit 1
    export PYTHONPATH=$site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

{
    nvidia-smi 2>&1 || true
    "$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

"$python" -m pytest -q -p no:cacheprovider tests/test_async_save.py 2>&1 | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}

methods="save/ours save/ours_async stage/floor save/floor save/floor_fsync load/ours load/floor"
# shellcheck disable=SC2086  # the lists are meant to split
"$python" -m bench.run --device "$device" --size ${SIZES:-300m 1b} --worlds 1 --reps "${REPS:-3}" --methods $methods \
    --work "$work" --no-remote --raw --results "$out/RESULTS-$device.md" 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
cp "$work/last-run.json" "$out/last-run-$device.json" 2>/dev/null

echo "tests: exit $tests; bench: exit $bench; written to $out"
exit $((tests || bench))
