#!/usr/bin/env bash
# Everything a session with a GPU runs, in one call, most wanted first: install the package (a
# real, non-editable install, so the .cu sources must come from package data), print the
# environment, the benchmark, `pytest -m gpu`, the per-kernel profile, compute-sanitizer
# (memcheck, racecheck, synccheck) on small runs, a batch on the GPU against the CPU, and the
# training step and `convcrf fit` on the GPU. Each step has a time limit of its own (a hang costs
# that step, not the rest); logs go to $OUT when set (the device tool), else to bench/gpu_logs/,
# and each finished step adds a line (exit status, seconds, last line of output) to summary.txt
# there, which is printed again at the end.
# Usage: bash bench/gpu_check.sh      (PYTHON=... to choose the interpreter; default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-bench/gpu_logs}"
PY="${PYTHON:-python3}"
mkdir -p "$LOG"
SUMMARY="$LOG/summary.txt"
: >"$SUMMARY"
# The repository's cuda/ directory would hide NVIDIA's `cuda` package (CuPy imports
# cuda.pathfinder) if the working directory were on sys.path.
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
if ! "$PY" -c 'import sys; sys.exit(not hasattr(sys.flags, "safe_path"))'; then
    echo "bench/gpu_check.sh: $PY ignores PYTHONSAFEPATH (Python 3.11 or newer needed)" >&2
    exit 2
fi
# the backend's choices of launch variant are timed afresh, not read from an earlier run
export CONVCRF_CACHE_DIR="$(mktemp -d)"
SITE="$(mktemp -d)"
status=0

# step NAME SECONDS LOGFILE COMMAND...: run COMMAND (stdin passed on) for at most SECONDS, its
# output to LOGFILE and the terminal; record the outcome in the summary
step() {
    local name=$1 limit=$2 log=$3 started=$SECONDS
    shift 3
    echo "== $name (at most ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]} last
    last="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c 1-100)"
    [ "$rc" -eq 124 ] && last="TIME LIMIT; last output: $last"
    printf '%-36s exit %3d %4d s  %s\n' "$name" "$rc" $((SECONDS - started)) "$last" \
        | tee -a "$SUMMARY"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

step install 120 "$LOG/install.log" "$PY" -m pip install -q --no-deps --no-build-isolation \
    --no-index --target "$SITE" . || exit 1
export PYTHONPATH="$SITE"
ls "$SITE/convcrf_cli/cuda"

step environment 120 "$LOG/info.log" bash -c \
    'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$0" -m convcrf_cli info' \
    "$PY"

step benchmark 200 "$LOG/bench.md" "$PY" bench/bench_gpu.py

step "pytest -m gpu" 240 "$LOG/pytest_gpu.log" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests

step "profile (time per kernel)" 120 "$LOG/profile.md" "$PY" bench/gpu_profile.py

SMALL_RUN='
import numpy as np
from convcrf_cli import CRFParams, refine
from convcrf_cli.backends import cuda, cuda_plan
rng = np.random.default_rng(0)
default_plan = cuda.CUDABackend(0, tune=False)  # no timing of variants under the sanitizer
for blur, k, init in ((2, 5, "log"), (1, 3, "softmax"), (4, 11, "softmax")):
    image = rng.uniform(0, 255, (2, 37, 45, 3)).astype(np.float32)
    logits = rng.normal(0, 2, (2, 21, 37, 45)).astype(np.float32)
    params = CRFParams(filter_size=k, blur=blur, init=init)
    scores = refine(image, logits, params, device=default_plan)
    assert np.isfinite(scores).all()
import dataclasses, cupy
# the kernels "auto" does not take at this size: split and tiled messages, fused iterations,
# and the full-resolution passes loading 8 classes at once
variants = (("split", False, 1, 1), ("tiled", False, 1, 1), ("per-cell", True, 3, 1),
            ("per-cell", False, 2, 8), ("per-cell", True, 3, 8))
for kernel, fuse, blur, group in variants:
    config = cuda.CUDABackend(0).launch_config()
    config = dataclasses.replace(config, message_kernel=kernel, fuse_message=fuse,
                                 load_group=group)
    image_d = cupy.asarray(image.transpose(0, 3, 1, 2).copy())
    logits_d = cupy.asarray(logits)
    params = CRFParams(filter_size=7, blur=blur, iterations=2)
    plan = cuda_plan.MeanFieldPlan.create(image_d.shape, logits_d.shape, params, config)
    assert (plan.message_kernel, plan.fused) == (kernel, fuse)
    scores_d = cupy.empty_like(logits_d)
    launcher = cuda.plan_launcher(0, plan)
    cuda_plan.run_plan(plan, image_d, logits_d, scores_d, launcher, cupy.empty)
    assert bool(cupy.isfinite(scores_d).all())
import torch, torch.nn.functional as F
from convcrf_cli.torch import ConvCRF
crf = ConvCRF.from_params(CRFParams(filter_size=5, blur=2), 21, "compat,scales,weight,C").cuda()
image_t = torch.from_numpy(image.transpose(0, 3, 1, 2).copy()).cuda()
logits_t = torch.from_numpy(logits).cuda().requires_grad_()
F.cross_entropy(crf(image_t, logits_t), logits_t.detach().argmax(1)).backward()
assert torch.isfinite(logits_t.grad).all()
print("small runs done (inference with each message kernel and fused, a training step)")
'
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck synccheck; do
        step "compute-sanitizer $tool" 120 "$LOG/sanitizer_$tool.log" \
            compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -c "$SMALL_RUN"
    done
else
    echo "compute-sanitizer not found: skipped" | tee -a "$SUMMARY"
fi

DATA="$(mktemp -d)"
"$PY" -m convcrf_cli synth "$DATA" --count 24 --size 375x500 >/dev/null
for device in cuda cpu; do
    step "batch --device $device" 120 "$LOG/batch_$device.log" "$PY" -m convcrf_cli batch \
        "$DATA/images" "$DATA/unaries" -o "$DATA/out_$device" --device "$device" \
        --out-format npy -v --report "$DATA/$device.jsonl"
done
step "batch labels: GPU against CPU" 60 "$LOG/batch_gpu.log" "$PY" - "$DATA" <<'COMPARE'
import sys, pathlib, numpy as np
root = pathlib.Path(sys.argv[1])
names = sorted(p.name for p in (root / "out_cuda").glob("*.npy"))
differing = [float((np.load(root / "out_cuda" / n) != np.load(root / "out_cpu" / n)).mean())
             for n in names]
print(f"{len(names)} label maps; largest share of pixels whose label differs: {max(differing):.2e}")
sys.exit(0 if len(names) == 24 and max(differing) < 1e-3 else 1)
COMPARE

step "training step on the GPU" 120 "$LOG/train_gpu.log" "$PY" - <<'TRAIN'
import statistics, torch, torch.nn.functional as F
from convcrf_cli import CRFParams, meanfield
from convcrf_cli.torch import ConvCRF
image = torch.rand(1, 3, 375, 500, device="cuda") * 255
logits = torch.randn(1, 21, 375, 500, device="cuda")
labels = torch.randint(0, 21, (1, 375, 500), device="cuda")

def median_ms(step, runs=13, warm=3):
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[warm:])

crf = ConvCRF.from_params(CRFParams(), 21).cuda()
module_ms = median_ms(lambda: F.cross_entropy(crf(image, logits), labels).backward())
print(f"ConvCRF forward+backward, 500x375, C=21, defaults: {module_ms:.1f} ms")
params = CRFParams()
kernel = meanfield.crf_kernel(image, params)
print("| mean field forward+backward, 500x375, C=21, defaults | ms |\n|---|---:|")
for fused, name in ((True, "fused CUDA kernels"), (False, "PyTorch operations on CUDA")):
    def step():
        logits_ = logits.clone().requires_grad_()
        kernel_ = kernel.clone().requires_grad_()
        meanfield.mean_field(logits_, kernel_, params, weight=torch.tensor(0.2, device="cuda",
                             requires_grad=True), fused=fused).sum().backward()
    print(f"| {name} | {median_ms(step):.2f} |")
TRAIN
step "convcrf fit --device cuda, 2 epochs" 120 "$LOG/fit_gpu.log" "$PY" -m convcrf_cli fit \
    "$DATA/images" "$DATA/unaries" "$DATA/labels" -o "$DATA/learned.json" --epochs 2 --device cuda

echo "== summary"
cat "$SUMMARY"
grep -m 1 -A 8 '^| case | plan' "$LOG/bench.md"
exit "$status"
