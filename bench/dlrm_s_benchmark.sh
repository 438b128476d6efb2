#!/usr/bin/env bash
# The original's benchmark (facebookresearch/dlrm bench/dlrm_s_benchmark.sh): the same model and flags
# (8 tables x 1M rows x 64, 100 lookups per bag, mini-batch 2048, bottom 512-512-64, top 1024-1024-1024-1,
# 1000 batches of random data), on CPU cores and on GPUs; one log per run and the best ms/it of each.
#
# Usage:
#   bench/dlrm_s_benchmark.sh [extra dlrm_s_pytorch.py flags]      e.g. --precision=bf16, or "--precision=bf16 ..."
#   SMALL=1 bench/dlrm_s_benchmark.sh                              sized down for small machines
#   CPU=0 GPU=1 NGPUS="1 2" bench/dlrm_s_benchmark.sh --precision=bf16
#
# Environment (defaults in brackets):
#   CPU [1]      run the CPU benchmark
#   GPU [auto]   run the GPU benchmark (1 when torch sees CUDA)
#   NCORES [all] cores of the CPU run, pinned with numactl or taskset when installed
#   NGPUS [1]    GPU counts to run, e.g. "1 2 4 8" as the original; more than one uses torchrun
#   SMALL [0]    1: tables of 100K rows and 100 batches instead of 1M rows and 1000 batches
#   NBATCHES, MB_SIZE, EMB_ROWS    override the corresponding settings
#   PROFILE [0]  1: add --enable-profiling, as the original always did (trace and tables beside each log)
#   OUT [.]      directory of the logs (relative to where the script is started)
set -euo pipefail
start_dir=$PWD
cd "$(dirname "$0")/.."

# extra options: one quoted string of flags, as the original takes them, or the flags one by one
if [[ $# == 1 ]]; then
  read -r -a extra_args <<< "$1"
else
  extra_args=("$@")
fi
python_bin=${PYTHON:-python}
cpu=${CPU:-1}
gpu=${GPU:-$($python_bin -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)}
ncores=${NCORES:-$(nproc)}
ngpus=${NGPUS:-1}
small=${SMALL:-0}
out=${OUT:-.}
[[ $out == /* ]] || out="$start_dir/$out"
mkdir -p "$out"

# the original's settings
rand_seed=727
print_freq=100
mb_size=${MB_SIZE:-2048}
nbatches=${NBATCHES:-1000}
bot_mlp="512-512-64"
top_mlp="1024-1024-1024-1"
emb_size=64
nindices=100
emb_rows=${EMB_ROWS:-1000000}
interaction="dot"
tnworkers=0
tmb_size=16384
if [[ $small == 1 ]]; then
  emb_rows=${EMB_ROWS:-100000}
  nbatches=${NBATCHES:-100}
  print_freq=10
fi
emb=$(printf "%s-" $(for _ in 1 2 3 4 5 6 7 8; do echo "$emb_rows"; done))
emb=${emb%-}

args=(--num-batches="$nbatches" --data-generation=random --arch-mlp-bot="$bot_mlp" --arch-mlp-top="$top_mlp"
      --arch-sparse-feature-size="$emb_size" --arch-embedding-size="$emb" --num-indices-per-lookup="$nindices"
      --arch-interaction-op="$interaction" --numpy-rand-seed="$rand_seed" --print-freq="$print_freq" --print-time
      --mini-batch-size="$mb_size" --test-mini-batch-size="$tmb_size" --test-num-workers="$tnworkers")
for setting in "NCORES=$ncores" "NBATCHES=$nbatches" "MB_SIZE=$mb_size" "EMB_ROWS=$emb_rows" $(printf "NGPUS=%s " $ngpus); do
  if ! [[ ${setting#*=} =~ ^[1-9][0-9]*$ ]]; then
    echo "dlrm_s_benchmark.sh: error: $setting: must be a positive whole number" >&2
    exit 2
  fi
done

profile() {  # sets `profiling`, the flags of a run whose log is $1: the trace and tables beside the log
  profiling=()
  if [[ ${PROFILE:-0} == 1 ]]; then
    profiling=(--enable-profiling "--profiling-trace-file=${1%.log}.json")
  fi
}

best_ms() {  # the fastest "N ms/it" of a log
  grep -o '[0-9.]* ms/it' "$1" | awk 'BEGIN {best = ""} {if (best == "" || $1 < best) best = $1} END {print best}'
}

run() {  # run LOG CMD...: runs CMD, its printed lines into LOG too, then prints the best time per iteration
  local log=$1
  shift
  echo "$*"
  "$@" | tee "$log"  # stderr (on a terminal: a progress line) stays out of the log
  echo "Min time per iteration = $(best_ms "$log") ms (log: $log)"
}

if [[ $cpu == 1 ]]; then
  echo "--------------------------------------------"
  echo "CPU Benchmarking - running on $ncores cores"
  echo "--------------------------------------------"
  pin=()
  if command -v numactl > /dev/null && numactl --show > /dev/null 2>&1; then
    pin=(numactl --physcpubind="0-$((ncores - 1))")
  elif command -v taskset > /dev/null; then
    pin=(taskset -c "0-$((ncores - 1))")
  fi
  log="$out/model1_CPU_PT_$ncores.log"
  profile "$log"
  OMP_NUM_THREADS=$ncores run "$log" \
    "${pin[@]}" "$python_bin" dlrm_s_pytorch.py "${args[@]}" "${profiling[@]}" "${extra_args[@]}"
fi

if [[ $gpu == 1 ]]; then
  echo "--------------------------------------------"
  echo "GPU Benchmarking - running on $ngpus GPUs"
  echo "--------------------------------------------"
  for ng in $ngpus; do
    gpus=$(seq -s, 0 $((ng - 1)))
    echo "Using GPUs: $gpus"
    if [[ $ng == 1 ]]; then
      launch=("$python_bin")
    else
      launch=(torchrun --standalone --nproc_per_node="$ng")
    fi
    log="$out/model1_GPU_PT_$ng.log"
    profile "$log"
    CUDA_VISIBLE_DEVICES=$gpus run "$log" \
      "${launch[@]}" dlrm_s_pytorch.py "${args[@]}" --use-gpu "${profiling[@]}" "${extra_args[@]}"
  done
fi
