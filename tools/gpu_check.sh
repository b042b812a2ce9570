#!/usr/bin/env bash
# Verify and benchmark tomocast on a CUDA machine in one go: the GPU tests, then every figure of
# docs/benchmarks.md's GPU section, each step's output in OUTDIR (default gpu-check/).
#
#   tools/gpu_check.sh [OUTDIR]
#
# Run it from the repository root with tomocast importable (installed, or PYTHONPATH=.) and a
# CUDA build of torch. Every step has its own time limit and the script goes on after a failed
# step, so one hang or crash costs that step only; `summary.txt` lists each step's exit status
# and wall time, and the script exits 1 when any step failed. Environment: PYTHON (default python3), DEVICE (default cuda), QUICK=1 (tiny
# sizes: checks the script itself, e.g. with DEVICE=cpu on a laptop), STEP_TIMEOUT (seconds per
# step, default 540).
set -uo pipefail

out=${1:-gpu-check}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
limit=${STEP_TIMEOUT:-540}
mkdir -p "$out"
: >"$out/summary.txt"
failed=0

# One step: NAME, then the command. stdout and stderr go to OUTDIR/NAME.log (and .json when the
# command writes JSON to stdout, see `bench`).
step() {
    local name=$1
    shift
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    ((status == 0)) || failed=1
    printf '%-22s exit %3d  %4d s\n' "$name" "$status" $((SECONDS - start)) | tee -a "$out/summary.txt"
}

# `bench NAME WHAT ARGS...`: `tomocast bench WHAT ARGS...`, its JSON document in OUTDIR/NAME.json
# and its log in NAME.log.
bench() {
    local name=$1
    shift
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$python" -m service.cli bench "$@" --device "$device" \
        --json >"$out/$name.json" 2>"$out/$name.log"
    local status=$?
    ((status == 0)) || failed=1
    printf '%-22s exit %3d  %4d s\n' "$name" "$status" $((SECONDS - start)) | tee -a "$out/summary.txt"
}

step environment bash -c "nvidia-smi 2>&1; $python -c 'import torch, sys; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", \
torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() \
else \"no CUDA device\")'"

if [[ ${QUICK:-0} == 1 ]]; then
    bench recon recon --sizes 64 --batch 2 --repeat 2 --peer-budget 1
    bench denoise denoise --sizes 64 --batches 1 2 --repeat 2 --variants eager,engine-fp32
    bench pipeline pipeline --rows 8 --cols 64 --scans 1 --batch 4
    exit "$failed"
fi

# Correctness first: every test marked gpu (fp16 TorchScript vs fp32, CUDA FBP vs CPU, graphs,
# tiling, the conveyor and the worker's row window, mixed-precision training steps with both
# adversarial losses).
step pytest-gpu "$python" -m pytest -m gpu -q -p no:cacheprovider tests

# Reconstruction (issue: >= 300 slices/s at 2048 x 1500 on an H100). Peers stay on the CPU.
bench recon recon --sizes 256 512 1024 2048 --batch 8 --repeat 20 --peer-budget 5
bench recon-2048x1500 recon --sizes 2048 --angles 1500 --batch 32 --repeat 10 --peer-budget 1

# Denoise engine (issue: TomoGAN fp16 at 1024^2 under 1.5 ms per slice).
bench denoise denoise --sizes 512 1024 2048 --batches 1 4 8 16 --repeat 10 \
    --variants eager,script,compile,engine-fp32,engine-fp16

# The no-harm guard beside the denoiser (issue 16: a small fraction of the denoise time).
bench guard guard --sizes 512 1024 2048 --angles 1500 --rows 16 --repeat 10

# Pipeline through a real service on loopback (FBP + TomoGAN per 2048^2 slice under 7 ms; the
# tail of a 2048-row scan, extrapolated from the per-slice cost at 128 rows).
bench pipeline pipeline --rows 128 --cols 1024 --angles 1536 --scans 3 --batch 16
bench pipeline-2048 pipeline --rows 64 --cols 2048 --angles 1500 --scans 2 --batch 16 --chunk 16
# float16 sinogram storage (ingest.sinogram_dtype): the default stays float32 until this says
bench pipeline-fp16 pipeline --rows 128 --cols 1024 --angles 1536 --scans 3 --batch 16 \
    --sinogram-dtype float16

# Mixed-precision training against fp32 (Li & Hu: 32% memory, 42% time saved on a GPU); needs a
# training file, made small here.
step dataset "$python" -m service.cli dataset -o "$out/train-small.h5" --phantoms 2 \
    --test-phantoms 1 --rows 8 --size 256 --angles 360 --sparse 8,16 --photons 1000 --seed 0 \
    --no-progress
step train-precision "$python" -m models.training.bench_train --data "$out/train-small.h5" \
    --arch resattunet --steps 20 --patch 128 --batch 16 --device "$device"
rm -f "$out/train-small.h5"

cat "$out/summary.txt"
exit "$failed"
