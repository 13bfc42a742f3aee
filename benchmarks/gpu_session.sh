#!/usr/bin/env bash
# Every GPU check and timing of this repository in one call on a lent NVIDIA machine, sized to
# fit a session's 15 minutes of device time with a machine start: GPU tests, the loading
# benchmark against the peers, and transformers' from_pretrained with device_map="cuda" (and,
# since the seventeenth session, where its own time goes: profile_floor.py).
# Everything it prints lands in $OUT too.
#
#   here:        benchmarks/gpu_wheels.sh            (fills .whl/, needs network)
#   device call: PROBE=0 bash benchmarks/gpu_session.sh   (carry: .whl; timeout_s 590)
#
# Each step has its own time limit, so one that hangs leaves time and output for the others
# (the limits of the steps run by default add up to 790 s, 765 with PROBE=0, plus up to 5 s of
# grace each and the unlimited imports and nvidia-smi: more than a call's timeout_s of 590, but
# the steps take far less: H200 run 11, the twenty-fourth session's first, took 476 s in all
# with the GIL profile, which is now left out, and without the cold step, which is new; the
# most wanted figures come first, so a call cut short loses the last steps only). Rows and
# cold runs that earlier runs settled are left out (the cold loads: H200 run 3, ours 1.04x the
# raw read, io="auto" 0.97x the better fixed mode; io="direct"; the driver,
# native, huge-page and sketch rows; the ring's shapes measured in H200 runs 6-8; torch's
# calls, 256 MiB of staging and reservations off, settled by runs 8-11); the rows now check
# the default, cuda_calls="ring" with 12 C readers and 128 MiB of staging, against 64 MiB
# (faster in run 11, even in run 12), io="buffered" (the ring's readers count their chunks'
# cached pages themselves under the default io="auto"), one load() of every file, and
# InstantTensor.
# LOAD_ROWS and WARM_ONLY_ROWS (bench_load.py's --only and --warm-only
# regexes) bring any row back; the benchmarks also stop starting timed runs at a deadline
# inside their limit, so that their checks, summaries and JSON are written whatever the
# machine's speed.
set -u -o pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
size=${SIZE_GB:-8}          # GB of bf16 in the synthetic checkpoint (the issues ask >= 8)
work=$(mktemp -d)           # checkpoint, peers, the children's logs: on the machine's disk
ckpt=$work/llama-${size}gb  # built once, shared by both benchmarks
started=$SECONDS
step() { echo; echo "=== $1 (t=$((SECONDS - started)) s)"; }
# SKIP="tests load mapping beside transformers cold gil floor": those steps left out (a second call of a session
# that has their figures already). Unset, it leaves out mapping and gil, whose questions H200
# runs 11 and 12 answered (transformers' slow table was the garbage collector's full pass);
# SKIP="" runs every step.
skip=${SKIP-mapping gil}
wanted() { [[ " $skip " != *" $1 "* ]]; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max \
    --format=csv || true
nproc; free -g | head -2; df -h "$work" | tail -1
python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'
# What a first load pays for its pinned staging: new pinned host memory, timed per size.
timeout -k 5 30 python3 -c 'import time, torch
if torch.cuda.is_available():
    torch.cuda.init()
    for mib in (64, 256, 1024):
        t = time.perf_counter(); b = torch.empty(mib << 20, dtype=torch.uint8, pin_memory=True)
        print(f"pinning {mib} MiB of new host memory: {time.perf_counter() - t:.3f} s"); del b
        torch._C._host_emptyCache() if hasattr(torch._C, "_host_emptyCache") else None
    # What a load pays to allocate its tensors on the device (a fresh caching allocator asks
    # the driver for each): 8 GiB at once (transformers warm-up), in 16 MiB tensors, and in
    # 16 MiB tensors carved from 8 GiB allocated and freed first (the warm-up then the load).
    for label, sizes, warm in (("8 GiB at once", [8 << 30], False),
                               ("8 GiB in 512 tensors", [16 << 20] * 512, False),
                               ("8 GiB in 512 tensors after a warm-up", [16 << 20] * 512, True)):
        torch.cuda.empty_cache(); torch.cuda.synchronize(); t = time.perf_counter()
        if warm:
            del_me = torch.empty(8 << 30, dtype=torch.uint8, device="cuda"); del del_me
        held = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]
        torch.cuda.synchronize()
        print(f"allocating {label} on the device: {time.perf_counter() - t:.3f} s"); del held
    torch.cuda.empty_cache()' || true

# transformers as pinned in .ci/run (the image's may be older); peers stay out of PYTHONPATH:
# bench_load.py installs each into its own folder, from .whl/ since there is no network.
site=$work/site
if ls .whl/transformers-*.whl >/dev/null 2>&1; then
    timeout -k 5 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/transformers-*.whl
fi
if [ -d "$site" ] && ! PYTHONPATH=$site python3 -c 'import transformers' 2>/dev/null; then
    echo "transformers from .whl does not import here; using the image's"; rm -rf "$site"
fi
export PYTHONPATH=$PWD:$site
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.whl
# Upstream fastsafetensors dlopens the unversioned libcudart.so; pip's CUDA runtime ships only
# libcudart.so.<major>. Without a toolkit on the image, give upstream the name it asks for.
if ! ldconfig -p 2>/dev/null | grep -q 'libcudart\.so '; then
    rt=$(python3 -c 'import glob, os, site
found = sorted(p for d in site.getsitepackages()
               for p in glob.glob(os.path.join(d, "nvidia", "**", "libcudart.so.*"), recursive=True))
print(found[-1] if found else "")')
    if [ -n "$rt" ]; then
        mkdir -p "$work/lib" && ln -sf "$rt" "$work/lib/libcudart.so"
        export LD_LIBRARY_PATH="$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "libcudart.so -> $rt (for upstream fastsafetensors)"
    fi
fi
# Byte-compiled before any clock: on the H200 machine (eighteenth session) every load compiled
# some 40 modules of transformers (installed above with --no-compile) and of this checkout from
# source inside the timed from_pretrained, as a user's installed packages never do.
python3 -c 'import os, sys; print("dont_write_bytecode", sys.flags.dont_write_bytecode,
    "PYTHONDONTWRITEBYTECODE", os.environ.get("PYTHONDONTWRITEBYTECODE"))'
timeout -k 5 40 python3 -m compileall -q -j 0 fastsafetensors benchmarks \
    ${site:+"$site"} >/dev/null || echo "compileall failed: imports compile from source"
python3 -c 'import transformers, safetensors, fastsafetensors as f;
print("transformers", transformers.__version__, "safetensors", safetensors.__version__,
      "fastsafetensors", f.__version__, f.__file__)'

# cuda_calls="native" and "ring" compile loader/readcopy.c and loader/ring.c on first use:
# built here, outside every clock.
timeout -k 5 15 python3 -c 'from fastsafetensors.loader import native, ring
print("native chunk calls:", native.build(), native.available() or "available")
print("ring:", native.build(source=ring.SOURCE), ring.available() or "available")' || true

if wanted tests; then
step "GPU tests"
timeout -k 5 80 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/gpu \
    tests/test_transformers.py tests/test_transformers_ahead.py tests/test_accelerate.py \
    tests/test_compat.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
fi

step "checkpoint: $size GB in $ckpt"
timeout -k 5 35 python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import _common as C, pathlib;
print(C.build_checkpoint(pathlib.Path(sys.argv[1]), float(sys.argv[2]))["files"])' "$ckpt" "$size"

if wanted load; then
step "bench_load: $size GB, warm and cold, peers"
timeout -k 5 "$(( ${LOAD_DEADLINE:-85} + 25 ))" python3 benchmarks/bench_load.py --size-gb "$size" --repeat "${LOAD_REPEAT:-4}" \
    --threads 8 --dir "$ckpt" --peers-dir "$work/peers" --logs "$work/logs" \
    --only "${LOAD_ROWS:-h2d_pinned|raw_reused_t16|^fst_cuda(_buffered|_s64)?\$|^fst_load_cuda\$|instanttensor_buffered}" \
    --warm-only "${WARM_ONLY_ROWS:-.}" \
    --deadline "${LOAD_DEADLINE:-85}" --timeout 60 \
    --skip-many \
    --json "$OUT/bench-load.json"
# The children's stderr, in one file ($OUT brings back at most 8).
tail -n 20 "$work"/logs/*.log > "$OUT/bench-load-children.log" 2>/dev/null
fi

# Why transformers' table of renamings took 0.27 s on the H200 machine, 0.04 s on the CPU VM
# (new in the twenty-fourth session): CPU time, page faults, switches and the collector's passes
# of the build, in fresh processes, with CUDA, lazy expressions and a load beside it or not.
if wanted mapping; then
step "probe_mapping: transformers' table of renamings"
timeout -k 5 60 python3 benchmarks/probe_mapping.py --dir "$ckpt" --timeout 25 \
    --cases "${MAPPING_CASES:-plain,lazy,cuda,cuda-lazy,cuda-lazy-nogc,cuda-lazy-load,cuda-lazy-load-nogc}" \
    --json "$OUT/probe-mapping.json"
fi

# A load on a thread beside the main thread's Python, regular expressions or GIL-holding
# sorts (new in the twentieth session: under from_pretrained, H200 run 8's reads ran at
# 15-16 GB/s, against 34-37 alone).
if wanted beside; then
step "probe_beside_gpu: a load beside the main thread's work"
timeout -k 5 60 python3 benchmarks/probe_beside_gpu.py --dir "$ckpt" --rounds 3
fi

if [ "${PROBE:-1}" != 0 ]; then   # PROBE=0: left out (a session that measured it already)
    step "probe: registering the cached files (a copy without staging), and new pinned memory"
    timeout -k 5 25 python3 benchmarks/probe_register.py --dir "$ckpt" --json "$OUT/probe-register.json"
fi

# -gc: pause_gc="off", the collector left on, as every load before the twenty-fourth session
# (H200 run 12: 0.41 s, against 0.25 with the collector off); stock-nogc: stock with the
# collector off around the call, the same pass put off for stock too. Each row says the
# collector's passes inside the call.
# (quiet, read_ahead="quiet", ran at 0.95-1.05x the default in run 11; s256 at 0.87-1.14x;
# few-slots, the ring's slots of H200 runs 6 and 7, ran at 0.94x the default in run 8; torch's
# calls, cuda_calls="torch", 0.80-0.82 s in runs 6 and 7; on-demand, read_ahead="off", in runs
# 3 and 4; switch-off, the interpreter's switch interval left alone, in run 6: 0.98x.)
if wanted transformers; then
step "bench_transformers: $size GB, device_map=${TF_DEVICE:-cuda}, warm"
timeout -k 5 "$(( ${TF_DEADLINE:-150} + 20 ))" python3 benchmarks/bench_transformers.py \
    --size-gb "$size" --repeat "${TF_REPEAT:-3}" --device "${TF_DEVICE:-cuda}" --dir "$ckpt" \
    --deadline "${TF_DEADLINE:-150}" --run-timeout 30 --cache warm \
    --no-floor --modes "${TF_MODES:-stock,fastsafetensors,fastsafetensors-gc,stock-nogc}" \
    --json "$OUT/bench-transformers.json"
fi

# Cold (new in the twenty-fourth session; last timed in the first H200 runs, 1.14-1.16x
# stock): one round each, the checkpoint's pages evicted before every load.
if wanted cold; then
step "bench_transformers: $size GB, device_map=${TF_DEVICE:-cuda}, cold"
timeout -k 5 80 python3 benchmarks/bench_transformers.py --size-gb "$size" --repeat 1 \
    --device "${TF_DEVICE:-cuda}" --dir "$ckpt" --deadline 60 --run-timeout 40 --cache cold \
    --no-floor --modes "${TF_COLD_MODES:-stock,fastsafetensors}" \
    --json "$OUT/bench-transformers-cold.json"
fi

# Who holds the GIL during from_pretrained (new in the twenty-third session): py-spy samples
# the thread holding it, 1,000 times a second, one load per mode in a fresh process. From
# .whl/ (gpu_wheels.sh); left out without it, and unless SKIP leaves it in (run 11 has it:
# transformers' thread held it 332 ms of our 495 ms load).
if wanted gil && ls .whl/py_spy-*.whl >/dev/null 2>&1; then
step "gil_profile: who holds the GIL in from_pretrained, device_map=${TF_DEVICE:-cuda}"
timeout -k 5 30 python3 -m pip install -q --no-index --no-deps --no-cache-dir \
    --target "$work/pyspy" .whl/py_spy-*.whl
timeout -k 5 70 python3 benchmarks/gil_profile.py --dir "$ckpt" --device "${TF_DEVICE:-cuda}" \
    --modes "${GIL_MODES:-stock,fastsafetensors,fastsafetensors-gc}" --py-spy "$work/pyspy/bin/py-spy" \
    --timeout 30 --out "$work/gil" --json "$OUT/gil-profile.json"
fi

# Where from_pretrained's own time goes (the floor twin: no bytes to move), by step and under
# cProfile; new in the seventeenth session (on the H100 machine the twin took 0.39-0.41 s, on
# the 2-core CPU VM 0.19). In H200 runs 8-11 ours spent 0.19-0.27 s in
# get_model_conversion_mapping (0.02-0.04 s on the CPU VM): the collector's full pass, which
# the -gc mode still pays.
if wanted floor; then
step "profile_floor: transformers' own time, device_map=${TF_DEVICE:-cuda}"
timeout -k 5 75 python3 benchmarks/profile_floor.py --size-gb "$size" --device "${TF_DEVICE:-cuda}" \
    --modes "${FLOOR_MODES:-stock,fastsafetensors,fastsafetensors-gc}" --repeat 3 \
    --profile 25 --deadline 65 \
    --run-timeout 20 --dir "$work/floor" --json "$OUT/profile-floor.json"
fi

if [ "${PER_TENSOR:-1}" != 0 ]; then   # PER_TENSOR=0: left out (measured in this session)
step "per-tensor cost: 20,000 small tensors, to the CPU and to cuda:0"
timeout -k 5 40 python3 benchmarks/bench_load.py --size-gb "$size" --dir "$ckpt" --only '^$' \
    --no-peers --repeat 3 --logs "$work/logs-many" --json "$OUT/bench-many.json"
fi

step "done"
sleep 1   # lets tee flush session.log before $OUT is collected
