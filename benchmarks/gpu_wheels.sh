#!/usr/bin/env bash
# Download, on a machine with network, the wheels that benchmarks/gpu_session.sh needs on a GPU
# machine that has none: the peers of bench_load.py, the transformers release CI pins, and
# py-spy (gil_profile.py).
# They land in .whl/ (ignored by git), which the device call carries. About 27 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for tag in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_30 \
           manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
# The GPU image runs CPython 3.12; the peers' versions are the ones in docs/benchmarks.md.
for spec in fastsafetensors==0.5.0 instanttensor==0.2.2 runai-model-streamer==0.17.0 \
            humanize typer transformers==5.23.0 py-spy==0.4.3; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl "$spec"
done
ls -l .whl
