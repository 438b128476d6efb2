#!/bin/bash
# DLRM on the Criteo Terabyte data set, with the original's benchmark flags.
#   bash bench/dlrm_s_criteo_terabyte.sh ["extra options" | extra options...]   (run where ./input/day_0 .. day_23[.gz] are)
# The first run preprocesses the 24 days into ./input/terabyte_processed/ (add
# "--dataset-multiprocessing" to use all cores); later runs reuse it. No data at hand?
#   python data_utils.py make-fake --rows 2400000 --days 24 --out input/day
# PYTHON overrides the interpreter. The log goes to ./run_terabyte_pt.log.
set -o pipefail

# extra options: one quoted string of flags, as the original takes them, or the flags one by one
if [[ $# == 1 ]]; then
    read -r -a dlrm_extra_options <<< "$1"
else
    dlrm_extra_options=("$@")
fi

dlrm_pt_bin=("${PYTHON:-python}" "$(dirname "$0")/../dlrm_s_pytorch.py")

echo "run pytorch ..."
# --arch-embedding-size comes from the data; --test-freq added so that the test AUC is reported
# the printed lines go to the log; on a terminal, progress bars and notes stay on the terminal
dlrm_args=(--arch-sparse-feature-size=64 --arch-mlp-bot="13-512-256-64" --arch-mlp-top="512-512-256-1" --max-ind-range=10000000 --data-generation=dataset --data-set=terabyte --raw-data-file=./input/day --processed-data-file=./input/terabyte_processed.npz --loss-function=bce --round-targets=True --learning-rate=0.1 --mini-batch-size=2048 --print-freq=1024 --print-time --test-freq=102400 --test-mini-batch-size=16384 --test-num-workers=16)
if [[ -t 2 ]]; then
    "${dlrm_pt_bin[@]}" "${dlrm_args[@]}" "${dlrm_extra_options[@]}" | tee run_terabyte_pt.log
else
    "${dlrm_pt_bin[@]}" "${dlrm_args[@]}" "${dlrm_extra_options[@]}" 2>&1 | tee run_terabyte_pt.log
fi
status=$?

echo "done"
exit $status
