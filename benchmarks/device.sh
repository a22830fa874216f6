#!/usr/bin/env bash
# The GPU benchmark in one call on a lent device machine (the `device` tool), whose image has torch 2.11 with CUDA,
# Python 3.12, accelerate 1.15 and transformers 5.17 but not the rest of our stack, and cannot reach any index.
#
#   bash benchmarks/device.sh fetch        # here: wheels for the device's Python into .whl/ (git-ignored), size checked
#   bash benchmarks/device.sh run [ARGS]   # there, with .whl carried: install them, run benchmarks/gpu.py ARGS,
#                                          # results and the log in $OUT (or benchmarks/results)
#
# What travels is capped at 64 MiB (the tree plus .whl); bitsandbytes alone is 43 MB, so only what gpu.py needs goes:
# no deepspeed, no tensorboard. fsspec and regex travel because datasets 5.2 and transformers 5.24 need versions the
# image may not have. Tried on 2026-11-27 on a CPU with the image's torch 2.11 and accelerate 1.15 and older
# transformers, peft and regex underneath: `run --tiny` installs and trains every variant kind.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        fsspec==2026.9.0 regex==2026.1.15 liger-kernel==0.8.5 bitsandbytes==0.50.2)
LIMIT=$((64 * 1024 * 1024))

case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # pip matches manylinux tags exactly: bitsandbytes 0.50.2 ships for 2_24 only
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $(printf -- '--platform manylinux_2_%s_x86_64 ' 17 24 27 28) --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | paste -sd+ | bc)
    wheels=$(stat -c %s .whl/*.whl | paste -sd+ | bc)
    echo "to carry: $((tree / 1024)) KiB of tree + $((wheels / 1024)) KiB of wheels (limit $((LIMIT / 1024)) KiB)"
    if ((tree + wheels > LIMIT)); then echo "over the limit: remove a wheel from .whl/ that this run does not need" >&2; exit 1; fi
    ;;
run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    results="${OUT:-benchmarks/results}"
    python3 benchmarks/gpu.py --results "$results" "$@" 2>&1 | tee "$results/log"
    ;;
*)
    echo "usage: bash benchmarks/device.sh fetch | run [gpu.py arguments]" >&2
    exit 2
    ;;
esac
