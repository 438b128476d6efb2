#!/bin/bash
# DLRM on the Criteo Kaggle data set, with the original's benchmark flags.
#   bash bench/dlrm_s_criteo_kaggle.sh ["extra options" | extra options...]     (run where ./input/train.txt is)
# The first run preprocesses ./input/train.txt into ./input/kaggleAdDisplayChallenge_processed/
# (minutes for the real 45.8M rows); later runs reuse it. No data at hand? Generate some:
#   python data_utils.py make-fake --rows 1000000 --out input/train.txt
# Example: bash bench/dlrm_s_criteo_kaggle.sh "--num-batches=1000 --test-num-workers=2"
# PYTHON overrides the interpreter. The log goes to ./run_kaggle_pt.log.
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
dlrm_args=(--arch-sparse-feature-size=16 --arch-mlp-bot="13-512-256-64-16" --arch-mlp-top="512-256-1" --data-generation=dataset --data-set=kaggle --raw-data-file=./input/train.txt --processed-data-file=./input/kaggleAdDisplayChallenge_processed.npz --loss-function=bce --round-targets=True --learning-rate=0.1 --mini-batch-size=128 --print-freq=1024 --print-time --test-freq=102400 --test-mini-batch-size=16384 --test-num-workers=16)
if [[ -t 2 ]]; then
    "${dlrm_pt_bin[@]}" "${dlrm_args[@]}" "${dlrm_extra_options[@]}" | tee run_kaggle_pt.log
else
    "${dlrm_pt_bin[@]}" "${dlrm_args[@]}" "${dlrm_extra_options[@]}" 2>&1 | tee run_kaggle_pt.log
fi
status=$?

echo "done"
exit $status
