#!/usr/bin/env bash
# Everything a session with a GPU runs, in one call: install the package (a real, non-editable
# install, so the .cu sources must come from package data), print the environment, run
# `pytest -m gpu`, the benchmark (early, so that a run cut short still has it), compute-sanitizer
# (memcheck, racecheck, synccheck) on small runs, a batch on the GPU against the CPU, and the
# training step and `convcrf fit` on the GPU. Logs go to $OUT when set (the device tool), else to bench/gpu_logs/.
# Usage: bash bench/gpu_check.sh      (PYTHON=... to choose the interpreter; default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-bench/gpu_logs}"
PY="${PYTHON:-python3}"
mkdir -p "$LOG"
# The repository's cuda/ directory would hide NVIDIA's `cuda` package (CuPy imports
# cuda.pathfinder) if the working directory were on sys.path.
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
# the backend's choices of launch variant are timed afresh, not read from an earlier run
export CONVCRF_CACHE_DIR="$(mktemp -d)"
SITE="$(mktemp -d)"
status=0

echo "== install"
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . \
    >"$LOG/install.log" 2>&1; then
    cat "$LOG/install.log"
    exit 1
fi
export PYTHONPATH="$SITE"
ls "$SITE/convcrf_cli/cuda" | tee -a "$LOG/install.log"

echo "== environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -m convcrf_cli info; } \
    2>&1 | tee "$LOG/info.log"

echo "== pytest -m gpu"
"$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests 2>&1 | tee "$LOG/pytest_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_backend.py tests/test_cuda_shim.py \
    tests/test_cuda_compile.py 2>&1 | tee "$LOG/pytest_cuda_cpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark"
"$PY" bench/bench_gpu.py 2>&1 | tee "$LOG/bench.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== compute-sanitizer"
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
        compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -c "$SMALL_RUN" \
            >"$LOG/sanitizer_$tool.log" 2>&1
        rc=$?
        echo "compute-sanitizer $tool: exit $rc ($(tail -n 1 "$LOG/sanitizer_$tool.log"))"
        [ "$rc" -eq 0 ] || status=1
    done
else
    echo "compute-sanitizer not found: skipped" | tee "$LOG/sanitizer.log"
fi

echo "== batch on the GPU (same-sized images share a launch) against the CPU"
DATA="$(mktemp -d)"
"$PY" -m convcrf_cli synth "$DATA" --count 24 --size 375x500 >/dev/null
for device in cuda cpu; do
    "$PY" -m convcrf_cli batch "$DATA/images" "$DATA/unaries" -o "$DATA/out_$device" \
        --device "$device" --out-format npy -v --report "$DATA/$device.jsonl" 2>&1 | tail -n 2
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
"$PY" - "$DATA" <<'COMPARE' 2>&1 | tee "$LOG/batch_gpu.log"
import sys, pathlib, numpy as np
root = pathlib.Path(sys.argv[1])
names = sorted(p.name for p in (root / "out_cuda").glob("*.npy"))
differing = [float((np.load(root / "out_cuda" / n) != np.load(root / "out_cpu" / n)).mean())
             for n in names]
print(f"{len(names)} label maps; largest share of pixels whose label differs: {max(differing):.2e}")
sys.exit(0 if len(names) == 24 and max(differing) < 1e-3 else 1)
COMPARE
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== learning on the GPU: the ConvCRF module's training step, and convcrf fit"
"$PY" - <<'TRAIN' 2>&1 | tee "$LOG/train_gpu.log"
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
for fused, name in ((None, "fused CUDA kernels"), (False, "PyTorch operations on CUDA")):
    def step():
        logits_ = logits.clone().requires_grad_()
        kernel_ = kernel.clone().requires_grad_()
        meanfield.mean_field(logits_, kernel_, params, weight=torch.tensor(0.2, device="cuda",
                             requires_grad=True), fused=fused).sum().backward()
    print(f"| {name} | {median_ms(step):.2f} |")
TRAIN
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
started=$SECONDS
"$PY" -m convcrf_cli fit "$DATA/images" "$DATA/unaries" "$DATA/labels" -o "$DATA/learned.json" \
    --epochs 2 --device cuda 2>&1 | tee -a "$LOG/train_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "convcrf fit --device cuda, 24 images, 2 epochs: $((SECONDS - started)) s" \
    | tee -a "$LOG/train_gpu.log"

exit "$status"
