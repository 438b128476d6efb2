#!/bin/bash
# The MLPerf-style Terabyte run of the original: memory-mapped binary split files
# (./input/terabyte_processed/{train,test,val}.bin, written once from the processed days),
# shuffled batches, a test every 102400 iterations, stop at test AUC 0.8025.
#   bash bench/run_and_time.sh ["extra options" | extra options...]             (run where ./input/day_0 .. day_23[.gz] are)
# PYTHON overrides the interpreter. The log goes to ./run_terabyte_mlperf_pt.log.
set -o pipefail

# extra options: one quoted string of flags, as the original takes them, or the flags one by one
if [[ $# == 1 ]]; then
    read -r -a dlrm_extra_options <<< "$1"
else
    dlrm_extra_options=("$@")
fi

# the printed lines go to the log; on a terminal, progress bars and notes stay on the terminal
dlrm_args=("$(dirname "$0")/../dlrm_s_pytorch.py" --arch-sparse-feature-size=128 --arch-mlp-bot="13-512-256-128" --arch-mlp-top="1024-1024-512-256-1" --max-ind-range=40000000 --data-generation=dataset --data-set=terabyte --raw-data-file=./input/day --processed-data-file=./input/terabyte_processed.npz --loss-function=bce --round-targets=True --learning-rate=1.0 --mini-batch-size=2048 --print-freq=2048 --print-time --test-freq=102400 --test-mini-batch-size=16384 --test-num-workers=16 --memory-map --mlperf-logging --mlperf-auc-threshold=0.8025 --mlperf-bin-loader --mlperf-bin-shuffle)
if [[ -t 2 ]]; then
    ${PYTHON:-python} "${dlrm_args[@]}" "${dlrm_extra_options[@]}" | tee run_terabyte_mlperf_pt.log
else
    ${PYTHON:-python} "${dlrm_args[@]}" "${dlrm_extra_options[@]}" 2>&1 | tee run_terabyte_mlperf_pt.log
fi
status=$?

echo "done"
exit $status
