"""Criteo datasets and loaders: identical batches from every storage, shuffling, training on them."""

import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import dlrm_data
import dlrm_s_pytorch as dlrm
from conftest import ROOT
from helpers import fake_kaggle, fake_terabyte, load_days, parse_tests, preprocess_quietly


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def kaggle_file(tmp_path_factory):
    return fake_kaggle(tmp_path_factory.mktemp("kaggle"), 7000, seed=4)


def dataset_args(raw, *extra):
    return dlrm.parse_args(["--data-generation=dataset", f"--raw-data-file={raw}", "--mini-batch-size=100",
                            "--test-mini-batch-size=128", "--numpy-rand-seed=5", *extra])


def quiet_datasets(args):
    return dlrm_data.make_criteo_datasets(args, log=lambda *a: None, progress=False)


def batches(dataset, num_workers=0):
    return list(dlrm_data.make_loader(dataset, num_workers=num_workers))


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for name in ("dense_x", "offsets", "indices", "target"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


@pytest.mark.parametrize("randomize", ["none", "day", "total"])
def test_in_memory_memory_mapped_with_workers_and_binary_loaders_give_identical_batches(kaggle_file, randomize):
    storage = {"memory": [], "mmap": ["--memory-map"], "bin": ["--mlperf-bin-loader"]}
    results = {}
    for name, flags in storage.items():
        train, test, sizes = quiet_datasets(dataset_args(kaggle_file, f"--data-randomize={randomize}", *flags))
        train.set_epoch(1)
        results[name] = (batches(train, num_workers=2 if name == "mmap" else 0), batches(test), sizes)
    for name in ("mmap", "bin"):
        assert_same_batches(results[name][0], results["memory"][0])
        assert_same_batches(results[name][1], results["memory"][1])
        assert results[name][2] == results["memory"][2]
    train_batches = results["memory"][0]
    assert len(train_batches) == 60 and train_batches[-1].batch_size == 6000 - 59 * 100


def test_batches_hold_the_processed_rows(kaggle_file, tmp_path):
    shutil.copy(kaggle_file, tmp_path / "train.txt")
    train, test, _ = quiet_datasets(dataset_args(tmp_path / "train.txt", "--data-randomize=none"))
    processed, _ = preprocess_quietly(str(tmp_path / "train.txt"), tmp_path / "kaggleAdDisplayChallenge_processed")
    label, dense, sparse = load_days(processed)
    batch = train[3]
    rows = slice(300, 400)
    torch.testing.assert_close(batch.dense_x, torch.log(torch.from_numpy(dense[rows].astype(np.float32)) + 1))
    np.testing.assert_array_equal(torch.stack(batch.lS_i).T.numpy(), sparse[rows])
    np.testing.assert_array_equal(batch.lS_o.numpy(), np.tile(np.arange(100), (26, 1)))
    np.testing.assert_array_equal(batch.target.numpy().ravel(), label[rows])
    first_test_row = sum(processed.day_rows[:6])
    np.testing.assert_array_equal(test[0].target.numpy().ravel(), label[first_test_row : first_test_row + 128])


@pytest.mark.parametrize("randomize", ["day", "total"])
def test_shuffling_is_a_fresh_reproducible_permutation_every_epoch(kaggle_file, randomize):
    train, _, _ = quiet_datasets(dataset_args(kaggle_file, f"--data-randomize={randomize}"))
    again, _, _ = quiet_datasets(dataset_args(kaggle_file, f"--data-randomize={randomize}"))
    orders = []
    for epoch in (0, 1):
        train.set_epoch(epoch)
        rows = np.concatenate([train.rows_of_batch(j) for j in range(len(train))])
        assert np.array_equal(np.sort(rows), np.arange(6000))  # every row once per epoch
        orders.append(rows)
        again.set_epoch(epoch)
        assert_same_batches([train[j] for j in (7, 3)], [again[j] for j in (7, 3)])  # any access order
    assert not np.array_equal(orders[0], orders[1])
    if randomize == "day":  # rows stay within their day: 6 days of 1000 rows, batches of 100
        assert all(orders[0][k * 1000 : (k + 1) * 1000].min() >= k * 1000 for k in range(6))
    other_seed, _, _ = quiet_datasets(dataset_args(kaggle_file, f"--data-randomize={randomize}", "--numpy-rand-seed=6"))
    assert not np.array_equal(np.concatenate([other_seed.rows_of_batch(j) for j in range(5)]), orders[0][:500])


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_permutation_is_a_permutation(n):
    values = dlrm_data.FeistelPermutation(n, [1, 2])(np.arange(n))
    assert np.array_equal(np.sort(values), np.arange(n))
    if n >= 1000:
        assert np.abs(values - np.arange(n)).mean() > n / 5  # really moves things


def test_memory_mapped_dataset_pickles_as_file_names(kaggle_file):
    train, _, _ = quiet_datasets(dataset_args(kaggle_file, "--memory-map"))
    train.set_epoch(3)
    expected = train[5]
    copy = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < 20_000
    assert_same_batches([copy[5]], [expected])


def test_bin_shuffle_reorders_whole_batches_per_epoch(kaggle_file):
    plain, _, _ = quiet_datasets(dataset_args(kaggle_file, "--mlperf-bin-loader", "--data-randomize=none"))
    shuffled, _, _ = quiet_datasets(dataset_args(kaggle_file, "--mlperf-bin-loader", "--mlperf-bin-shuffle",
                                                 "--data-randomize=none"))
    firsts = []
    for epoch in (0, 1):
        shuffled.set_epoch(epoch)
        order = [int(shuffled.rows_of_batch(j)[0]) // 100 for j in range(len(shuffled))]
        assert sorted(order) == list(range(len(plain)))
        assert_same_batches([shuffled[3]], [plain[order[3]]])
        firsts.append(order)
    assert firsts[0] != firsts[1]


def test_terabyte_memory_mapped_batches_cross_day_boundaries(tmp_path):
    prefix = fake_terabyte(tmp_path, 24 * 30, compress=True)
    flags = ["--data-generation=dataset", "--data-set=terabyte", f"--raw-data-file={prefix}", "--mini-batch-size=64",
             "--max-ind-range=500", "--data-randomize=none"]
    mapped, test, sizes = quiet_datasets(dlrm.parse_args(flags + ["--memory-map"]))
    in_memory, _, _ = quiet_datasets(dlrm.parse_args(flags))
    assert mapped.num_rows == 23 * 30 and test.num_rows == 15 and max(sizes) <= 500
    assert_same_batches(batches(mapped), batches(in_memory))


def write_original_bin_files(folder, rows=(300, 50, 50), seed=0):
    """The original's Terabyte --mlperf-bin-loader files: <folder>/terabyte_processed_{train,test,val}.bin of
    int32 records [label, 13 integers, 26 ids] and the table sizes <folder>/day_fea_count.npz."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 2000, 26)
    records = {}
    for split, n in zip(("train", "test", "val"), rows):
        records[split] = np.concatenate([rng.integers(0, 2, (n, 1)), rng.integers(0, 1000, (n, 13)),
                                         rng.integers(0, counts, (n, 26))], axis=1).astype(np.int32)
        records[split].tofile(folder / f"terabyte_processed_{split}.bin")
    np.savez(folder / "day_fea_count.npz", counts=counts)
    return records, counts


def assert_batches_hold_records(dataset, records, size, fold=None):
    """Batch j of `dataset` holds records [j*size, (j+1)*size) of int [n, 40] records (label, 13 integers, 26 ids) in
    order, as the original's loaders give them: dense log(x + 1), ids folded by `fold` when given, one id per bag."""
    assert len(dataset) == -(-len(records) // size)
    for j in range(len(dataset)):
        rows = records[j * size : (j + 1) * size]
        batch = dataset[j]
        ids = rows[:, 14:] % fold if fold else rows[:, 14:]
        assert torch.equal(batch.dense_x, torch.log(torch.tensor(rows[:, 1:14], dtype=torch.float32) + 1))
        assert batch.target.view(-1).tolist() == rows[:, 0].tolist()
        assert batch.indices.tolist() == ids.T.reshape(-1).tolist()  # table after table
        assert batch.offsets.tolist() == list(range(0, 26 * len(rows) + 1))


ORIGINAL_BIN_FLAGS = ["--data-generation=dataset", "--data-set=terabyte", "--mlperf-bin-loader",
                      "--mini-batch-size=64", "--test-mini-batch-size=32"]


@pytest.mark.parametrize("max_ind_range", [-1, 700])
def test_the_originals_terabyte_bin_files_are_read_as_the_original_reads_them(tmp_path, max_ind_range, capsys):
    """Its CriteoBinDataset: batches of consecutive records in file order (its preprocessing shuffled them),
    dense log(x + 1), ids folded by --max-ind-range when read, the tables its counts (at most M)."""
    records, counts = write_original_bin_files(tmp_path)
    args = dlrm.parse_args([*ORIGINAL_BIN_FLAGS, f"--raw-data-file={tmp_path / 'day'}", f"--max-ind-range={max_ind_range}",
                            f"--processed-data-file={tmp_path / 'terabyte_processed.npz'}", "--data-randomize=day"])
    messages = []
    train, test, sizes = dlrm_data.make_criteo_datasets(args, log=messages.append, progress=False)
    assert capsys.readouterr().err == ("note: --data-randomize=day has no effect on the original's .bin files: "
                                       "its preprocessing shuffled the rows, read in the files' order as the "
                                       "original does\n")
    args.data_randomize = "total"  # the default: no note on every run
    dlrm_data.make_criteo_datasets(args, log=messages.append, progress=False)
    assert capsys.readouterr().err == ""
    messages = messages[:1]
    assert messages == [f"Reading the original's --mlperf-bin-loader data={tmp_path / 'terabyte_processed_train.bin'} "
                        f"(300 rows), {tmp_path / 'terabyte_processed_test.bin'} (50 rows), in their order; table "
                        f"sizes from {tmp_path / 'day_fea_count.npz'}"]
    fold = max_ind_range if max_ind_range > 0 else None
    assert sizes == [min(int(c), fold or int(c)) for c in counts]
    assert_batches_hold_records(train, records["train"], 64, fold)
    assert_batches_hold_records(test, records["test"], 32, fold)


def test_the_originals_bin_files_train_and_resume(tmp_path, run_main):
    write_original_bin_files(tmp_path)
    flags = [*ORIGINAL_BIN_FLAGS, f"--raw-data-file={tmp_path / 'day'}", "--arch-sparse-feature-size=4",
             "--arch-mlp-bot=13-4", "--arch-mlp-top=8-1", "--mlperf-bin-shuffle", "--print-freq=1",
             f"--processed-data-file={tmp_path / 'terabyte_processed.npz'}", "--max-ind-range=500"]
    code, full, err = run_main(*flags)
    assert code == 0, err
    assert "Finished training it 5/5 of epoch 0" in full
    code, _, err = run_main(*flags, "--num-batches=2", f"--save-model={tmp_path / 'm.pt'}", "--test-freq=2")
    assert code == 0, err
    code, resumed, err = run_main(*flags, f"--load-model={tmp_path / 'm.pt'}")
    assert code == 0, err
    losses = [line for line in full.splitlines() if line.startswith("Finished training it")]
    assert losses[2:] == [line for line in resumed.splitlines() if line.startswith("Finished training it")]


@pytest.mark.parametrize("damage,message", [
    ("truncated", "terabyte_processed_train.bin: 47999 bytes is not a whole number of 160-byte records"),
    ("no test", "the original's --mlperf-bin-loader file {tmp}/terabyte_processed_test.bin is missing (found "
                "{tmp}/terabyte_processed_train.bin, {tmp}/terabyte_processed_val.bin): restore it, or move the "
                "original's .bin files away to preprocess the raw day files instead"),
    ("only val", "the original's --mlperf-bin-loader file {tmp}/terabyte_processed_train.bin is missing (found "
                 "{tmp}/terabyte_processed_val.bin)"),
    ("junk counts", "day_fea_count.npz: not the original's table sizes file (not a NumPy .npz archive)"),
    ("counts of other data", "terabyte_processed_train.bin: row 0 holds id 64 of categorical feature 0, outside the "
                             "10 rows of its table by {tmp}/day_fea_count.npz: the table sizes of other data?"),
    ("no counts", "the original's {tmp}/terabyte_processed_train.bin needs its table sizes, <raw>_fea_count.npz "
                  "({tmp}/day_fea_count.npz not found): give --raw-data-file=<the prefix of the raw day files the "
                  "original was given>"),
    ("bad counts", "day_fea_count.npz: counts should be 26 positive integers"),
    ("empty test", "terabyte_processed_test.bin: empty"),
])
def test_damaged_or_incomplete_original_bin_files_are_one_line(tmp_path, run_main, damage, message):
    write_original_bin_files(tmp_path)
    train, test = tmp_path / "terabyte_processed_train.bin", tmp_path / "terabyte_processed_test.bin"
    if damage == "truncated":
        train.write_bytes(train.read_bytes()[:-1])
    elif damage == "no test":
        test.unlink()
    elif damage == "only val":
        train.unlink()
        test.unlink()
    elif damage == "junk counts":
        (tmp_path / "day_fea_count.npz").write_bytes(b"not an archive")
    elif damage == "counts of other data":
        records = np.fromfile(train, dtype=np.int32).reshape(-1, 40)
        records[0, 14] = 64
        records.tofile(train)
        np.savez(tmp_path / "day_fea_count.npz", counts=np.full(26, 10))
    elif damage == "no counts":
        (tmp_path / "day_fea_count.npz").unlink()
    elif damage == "bad counts":
        np.savez(tmp_path / "day_fea_count.npz", counts=np.arange(26) - 1)
    else:
        test.write_bytes(b"")
    code, _, err = run_main(*ORIGINAL_BIN_FLAGS, f"--raw-data-file={tmp_path / 'day'}", "--arch-mlp-bot=13-2",
                            f"--processed-data-file={tmp_path / 'terabyte_processed.npz'}")
    assert code == 1 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("dlrm_s_pytorch.py: error: ") and message.format(tmp=tmp_path) in last, err


def test_the_originals_validation_bin_file_is_not_read_when_unused(tmp_path):
    write_original_bin_files(tmp_path)
    (tmp_path / "terabyte_processed_val.bin").write_bytes(b"damaged")
    args = dlrm.parse_args([*ORIGINAL_BIN_FLAGS, f"--raw-data-file={tmp_path / 'day'}",
                            f"--processed-data-file={tmp_path / 'terabyte_processed.npz/'}"])
    train, test, _ = quiet_datasets(args)
    assert train.num_rows == 300 and test.num_rows == 50


def test_one_of_the_originals_bin_files_given_as_processed_data_names_the_flags(tmp_path, run_main):
    write_original_bin_files(tmp_path)
    code, _, err = run_main(*ORIGINAL_BIN_FLAGS, "--arch-mlp-bot=13-2", f"--raw-data-file={tmp_path / 'day'}",
                            f"--processed-data-file={tmp_path / 'terabyte_processed_train.bin'}")
    assert code == 1 and err.splitlines()[-1] == (
        f"dlrm_s_pytorch.py: error: --processed-data-file {tmp_path / 'terabyte_processed_train.bin'}: one of the "
        "original's --mlperf-bin-loader files; they are read with --mlperf-bin-loader --data-set=terabyte "
        f"--processed-data-file={tmp_path / 'terabyte_processed'}.npz")


def write_original_reordered(folder, data_set="terabyte", day_rows=None, seed=0):
    """The original's --memory-map output: <prefix>_<d>_reordered.npz of each day (y, X_int, X_cat as float64, as it
    writes them, compressed), <stem>_fea_count.npz and <stem>_day_count.npz; returns (the raw data file it was made
    from, the rows of each day as int64 [n, 40] records, counts)."""
    rng = np.random.default_rng(seed)
    days = 24 if data_set == "terabyte" else 7
    day_rows = day_rows or [int(n) for n in rng.integers(5, 30, days)]
    stem, prefix = (folder / "day", folder / "day") if data_set == "terabyte" else (folder / "train", folder / "train_day")
    counts = rng.integers(5, 2000, 26)
    records = []
    for day, n in enumerate(day_rows):
        rows = np.concatenate([rng.integers(0, 2, (n, 1)), rng.integers(0, 1000, (n, 13)),
                               rng.integers(0, counts, (n, 26))], axis=1)
        np.savez_compressed(f"{prefix}_{day}_reordered.npz", X_cat=rows[:, 14:].astype(np.float64),
                            X_int=rows[:, 1:14].astype(np.float64), y=rows[:, 0].astype(np.float64))
        records.append(rows)
    np.savez_compressed(f"{stem}_fea_count.npz", counts=counts.astype(np.int32))
    np.savez_compressed(f"{stem}_day_count.npz", total_per_file=np.array(day_rows))
    raw = folder / ("day" if data_set == "terabyte" else "train.txt")
    return raw, records, counts


def original_reordered_args(raw, data_set, *extra):
    return dlrm.parse_args(["--data-generation=dataset", f"--data-set={data_set}", f"--raw-data-file={raw}",
                            "--memory-map", "--mini-batch-size=16", "--test-mini-batch-size=8", *extra])


@pytest.mark.parametrize("data_set,max_ind_range,bin_loader", [("terabyte", -1, False), ("kaggle", 700, False),
                                                               ("terabyte", 700, True)])
def test_the_originals_memory_map_files_are_read_as_the_original_reads_them(tmp_path, capsys, data_set,
                                                                            max_ind_range, bin_loader):
    """Its CriteoDataset with memory_map: days 0 .. D-2 train, the last day's first ceil(n/2) rows test, in the
    files' order, dense log(x + 1), ids folded by --max-ind-range when read, the tables its counts (at most M);
    converted once into memory-mappable files beside them (with --mlperf-bin-loader, .bin files made from them)."""
    raw, records, counts = write_original_reordered(tmp_path, data_set)
    extra = [f"--max-ind-range={max_ind_range}", "--data-randomize=day"] + ["--mlperf-bin-loader"] * bin_loader
    messages = []
    train, test, sizes = dlrm_data.make_criteo_datasets(original_reordered_args(raw, data_set, *extra),
                                                        log=messages.append, progress=False)
    prefix = tmp_path / ("day" if data_set == "terabyte" else "train_day")
    converted = tmp_path / f"{'terabyte' if data_set == 'terabyte' else 'kaggleAdDisplayChallenge'}_processed"
    assert messages[0] == (f"Converting the original's --memory-map files {prefix}_0_reordered.npz .. "
                           f"{prefix.name}_{len(records) - 1}_reordered.npz into {converted / 'original-memory-map'} "
                           "(once: read memory-mapped from there)")
    assert messages[1].startswith(f"Reading the original's --memory-map data={prefix}_<day>_reordered.npz (as ")
    assert capsys.readouterr().err == ("note: --data-randomize=day has no effect on the original's --memory-map "
                                       "files: its preprocessing ordered the rows, read in the files' order as the "
                                       "original does\n")
    fold = max_ind_range if max_ind_range > 0 else None
    assert sizes == [min(int(c), fold or int(c)) for c in counts]
    last = records[-1]
    expected = {"train": np.concatenate(records[:-1]), "test": last[: (len(last) + 1) // 2]}
    assert_batches_hold_records(train, expected["train"], 16, fold)
    assert_batches_hold_records(test, expected["test"], 8, fold)
    messages.clear()
    dlrm_data.make_criteo_datasets(original_reordered_args(raw, data_set, *extra), log=messages.append, progress=False)
    assert not any(m.startswith("Converting") for m in messages)  # converted once
    os.utime(f"{prefix}_3_reordered.npz", ns=(1, 1))  # the original's files changed: converted again
    dlrm_data.make_criteo_datasets(original_reordered_args(raw, data_set, *extra), log=messages.append, progress=False)
    assert f"Converting again into {converted / 'original-memory-map'}: {prefix.name}_3_reordered.npz changed (size " \
           "or modification time)" in messages


@pytest.mark.parametrize("damage,message", [
    ("missing day", "the original's --memory-map files of {tmp}/day are incomplete: {tmp}/day_5_reordered.npz not "
                    "found (its days are {tmp}/day_0_reordered.npz .. day_23_reordered.npz)"),
    ("junk", "day_2_reordered.npz: not a readable .npz (BadZipFile: File is not a zip file)"),
    ("no X_cat", "day_2_reordered.npz: not one of the original's --memory-map day files (no X_cat)"),
    ("label 2", "day_2_reordered.npz: y row 3 holds 2.0, not a click label (0 or 1)"),
    ("fraction", "day_2_reordered.npz: X_int row 1, column 4 holds 0.5, not an integer"),
    ("id outside", "day_2_reordered.npz: X_cat row 0, column 7 holds 5000.0, outside its table of"),
    ("wrong width", "day_2_reordered.npz: X_int is float64 (10, 12), not rows of 13 numbers"),
    ("day counts", "day_day_count.npz: day 2 has 11 rows by it, {tmp}/day_2_reordered.npz holds 10: the day counts "
                   "of other data"),
])
def test_damaged_original_memory_map_files_are_one_line_and_leave_nothing(tmp_path, run_main, damage, message):
    raw, records, counts = write_original_reordered(tmp_path, "terabyte", day_rows=[10] * 24)
    day2 = tmp_path / "day_2_reordered.npz"
    arrays = {"X_cat": records[2][:, 14:].astype(float), "X_int": records[2][:, 1:14].astype(float),
              "y": records[2][:, 0].astype(float)}
    if damage == "missing day":
        (tmp_path / "day_5_reordered.npz").unlink()
    elif damage == "junk":
        day2.write_bytes(b"junk")
    elif damage == "no X_cat":
        del arrays["X_cat"]
    elif damage == "label 2":
        arrays["y"][3] = 2
    elif damage == "fraction":
        arrays["X_int"][1, 4] = 0.5
    elif damage == "id outside":
        arrays["X_cat"][0, 7] = 5000
    elif damage == "wrong width":
        arrays["X_int"] = arrays["X_int"][:, :12]
    else:
        np.savez(tmp_path / "day_day_count.npz", total_per_file=np.array([10, 10, 11] + [10] * 21))
    if damage not in ("missing day", "junk", "day counts"):
        np.savez_compressed(day2, **arrays)
    code, _, err = run_main("--data-generation=dataset", "--data-set=terabyte", f"--raw-data-file={raw}", "--memory-map",
                            "--arch-mlp-bot=13-2", "--max-ind-range=2000")
    assert code == 1 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("dlrm_s_pytorch.py: error: ") and message.format(tmp=tmp_path) in last, err
    converted = tmp_path / "terabyte_processed" / "original-memory-map"
    assert not converted.exists() or not [p for p in os.listdir(converted) if not p.startswith(".")]


def test_the_originals_memory_map_files_convert_into_the_processed_data_folder(tmp_path):
    """The original's folder is only read (a shared, read-only data set); a conversion lives with our processed data."""
    (tmp_path / "shared").mkdir()
    raw, _, _ = write_original_reordered(tmp_path / "shared", "kaggle")
    before = sorted(os.listdir(tmp_path / "shared"))
    args = original_reordered_args(raw, "kaggle", f"--processed-data-file={tmp_path / 'mine' / 'kaggle.npz'}")
    train, _, _ = quiet_datasets(args)
    assert sorted(os.listdir(tmp_path / "shared")) == before
    assert (tmp_path / "mine" / "kaggle" / "original-memory-map" / "metadata.json").exists() and train.num_rows > 0


def test_memory_map_with_the_bin_loader_is_not_called_without_effect_when_it_reads_the_originals_files(
        tmp_path, run_main):
    raw, _, _ = write_original_reordered(tmp_path, "terabyte")
    flags = ["--data-generation=dataset", "--data-set=terabyte", f"--raw-data-file={raw}", "--mlperf-bin-loader",
             "--arch-mlp-bot=13-2", "--num-batches=1", "--data-randomize=none"]
    code, out, err = run_main(*flags, "--memory-map")
    assert code == 0 and "--memory-map has no effect" not in err and "the original's --memory-map data" in out, err
    (tmp_path / "day_0_reordered.npz").rename(tmp_path / "elsewhere.npz")  # none of its files: the .bin files decide
    for day in range(1, 24):
        (tmp_path / f"day_{day}_reordered.npz").unlink()
    code, out, err = run_main(*flags, "--memory-map")
    assert "note: --memory-map has no effect with --mlperf-bin-loader" in err


def test_incomplete_original_memory_map_files_beside_the_raw_data_leave_it_to_preprocessing(kaggle_file, tmp_path,
                                                                                          capsys):
    raw = tmp_path / "train.txt"
    shutil.copy(kaggle_file, raw)
    write_original_reordered(tmp_path, "kaggle")
    (tmp_path / "train_day_6_reordered.npz").unlink()
    train, _, _ = quiet_datasets(original_reordered_args(raw, "kaggle"))
    assert train.num_rows == 6000
    assert capsys.readouterr().err == (f"note: the original's --memory-map files of {raw} are incomplete "
                                       f"({tmp_path / 'train_day_6_reordered.npz'} not found): the raw data is "
                                       "preprocessed instead\n")


def test_test_split_is_whole_whatever_num_batches(kaggle_file):
    train, test, _ = quiet_datasets(dataset_args(kaggle_file, "--num-batches=2"))
    assert test.num_rows == 500 and len(test) == 4 and test.samples_in_batch(3) == 500 - 3 * 128


def test_bottom_mlp_must_take_the_13_dense_features(kaggle_file, run_main):
    code, _, err = run_main("--data-generation=dataset", f"--raw-data-file={kaggle_file}", "--arch-mlp-bot=4-3-2")
    assert code == 1 and err.strip().splitlines()[-1] == (
        "dlrm_s_pytorch.py: error: the data has 13 dense features but --arch-mlp-bot starts with 4")


TRAIN = re.compile(r"^Finished training it (\d+)/\d+ of epoch (\d+), .* loss ([\d.]+)$")


@pytest.mark.slow
def test_training_on_generated_data_learns_and_resumes_exactly(kaggle_file, run_main, tmp_path):
    flags = ["--data-generation=dataset", f"--raw-data-file={kaggle_file}", "--arch-sparse-feature-size=8",
             "--arch-mlp-bot=13-16-8", "--arch-mlp-top=16-1", "--loss-function=bce", "--optimizer=adagrad",
             "--learning-rate=0.05", "--mini-batch-size=64", "--nepochs=2", "--test-freq=47", "--memory-map",
             "--num-workers=1", "--data-randomize=total"]
    code, full, err = run_main(*flags)
    assert code == 0, err
    aucs = [auc for _, _, _, auc, _ in parse_tests(full)]
    assert len(aucs) == 4 and max(aucs[:2]) > 0.7  # the generator's planted signal is learnt in one epoch
    checkpoint = tmp_path / "model.pt"
    code, saved, err = run_main(*flags, "--mlperf-auc-threshold=0.6", f"--save-model={checkpoint}")
    assert code == 0 and "threshold 0.6 reached" in saved, err
    code, resumed, err = run_main(*flags, f"--load-model={checkpoint}")
    assert code == 0, err
    losses = {(m.group(2), m.group(1)): m.group(3) for m in map(TRAIN.match, full.splitlines()) if m}
    resumed_losses = {(m.group(2), m.group(1)): m.group(3) for m in map(TRAIN.match, resumed.splitlines()) if m}
    assert len(resumed_losses) == 2 * 94 - 47  # the rest of epoch 0, all of epoch 1
    assert all(losses[k] == v for k, v in resumed_losses.items())  # the same shuffled batches


@pytest.mark.slow
def test_kaggle_bench_script_runs_end_to_end_and_reports_auc(tmp_path):
    (tmp_path / "input").mkdir()
    fake_kaggle(tmp_path / "input", 14000, seed=2)
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "dlrm_s_criteo_kaggle.sh"),
                             "--num-batches=40 --test-num-workers=2 --print-freq=10"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r" test loss=[\d.]+, auc=0\.\d+", result.stdout), result.stdout
    assert (tmp_path / "input" / "kaggleAdDisplayChallenge_processed" / "kaggle-dictionary" / "metadata.json").exists()
    assert (tmp_path / "run_kaggle_pt.log").exists()


def test_dataset_mode_needs_data_and_other_modes_refuse_data_files(run_main):
    code, _, err = run_main("--data-generation=dataset")
    assert code == 1 and "--data-generation=dataset needs --raw-data-file" in err
    code, _, err = run_main("--processed-data-file=x.npz")
    assert code == 1 and "--processed-data-file needs --data-generation=dataset (it is random)" in err
    code, _, err = run_main("--data-generation=dataset", "--processed-data-file=/nonexistent/p.npz",
                            "--arch-mlp-bot=13-3-2")
    assert code == 1 and err.strip() == ("dlrm_s_pytorch.py: error: no processed data in /nonexistent/p "
                                         "and no --raw-data-file to build it from")


@pytest.mark.parametrize("argv,message", [
    (["--arch-mlp-bot=13-8"], "--arch-sparse-feature-size 16 does not match last dim of bottom mlp 8"),
    (["--arch-mlp-bot=12-16"], "the data has 13 dense features but --arch-mlp-bot starts with 12"),
])
def test_layer_widths_that_cannot_work_stop_before_the_data_is_prepared(tmp_path, run_main, argv, message):
    raw = fake_kaggle(tmp_path, 200)
    code, out, err = run_main("--data-generation=dataset", f"--raw-data-file={raw}", "--arch-sparse-feature-size=16",
                              "--arch-mlp-top=8-1", *argv)
    assert code == 1 and out == "" and message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [os.path.basename(raw)]  # nothing preprocessed


@pytest.mark.parametrize("kernels", ["native", "numpy"])
@pytest.mark.parametrize("fixed", [True, False])
def test_random_bags_hold_each_drawn_id_once_sorted(fixed, kernels, monkeypatch):
    """A random bag is the sorted distinct ids of its draws (a per-bag np.unique reference), made by the
    native kernels or by NumPy alike."""
    from dlrmkit import kernels as native_kernels

    if kernels == "numpy":
        monkeypatch.setattr(native_kernels, "pad_bags", lambda *_: None)
        monkeypatch.setattr(native_kernels, "distinct_sorted_bags", lambda *_: None)
    elif not native_kernels.native():
        pytest.skip(f"no native kernels: {native_kernels.status()}")
    rng = np.random.default_rng(7)
    for rows in (5, 1, 40, 2**31, 2**40):
        sizes = np.full(32, 6) if fixed else rng.integers(1, 7, 32)
        ids = rng.integers(0, rows, int(sizes.sum()))
        lengths, kept = dlrm_data._unique_within_bags(ids.copy(), sizes, rows)
        expected = [np.unique(bag) for bag in np.split(ids, np.cumsum(sizes)[:-1])]
        assert lengths.tolist() == [len(bag) for bag in expected]
        assert kept.tolist() == np.concatenate(expected).tolist()
    config = dlrm_data.RandomDataConfig(num_indices_per_lookup=6, num_indices_per_lookup_fixed=fixed)
    batch = dlrm_data.RandomDataset(2, [5, 1, 40], 64, 32, seed=3, config=config)[1]
    for t in range(3):
        indices, offsets, _ = batch.sparse.table(t)
        bags = np.split(indices.numpy(), offsets[1:].numpy())
        assert len(bags) == 32 and all(bag.tolist() == sorted(set(bag.tolist())) for bag in bags)


@pytest.mark.parametrize("kernels", ["native", "numpy"])
def test_zero_ids_per_lookup_mean_one_id_or_with_fixed_none_as_in_the_original(kernels, monkeypatch):
    from dlrmkit import kernels as native_kernels

    if kernels == "numpy":
        monkeypatch.setattr(native_kernels, "_library", lambda: (None, "switched off by the test"))

    def batch(ids, fixed):
        config = dlrm_data.RandomDataConfig(num_indices_per_lookup=ids, num_indices_per_lookup_fixed=fixed)
        return dlrm_data.RandomDataset(3, [5, 1, 40], 64, 16, seed=3, config=config)[1]

    one, zero = batch(1, False), batch(0, False)  # max(1, round(U * 0)): one id, the same draws as 1
    assert torch.equal(one.sparse.indices, zero.sparse.indices) and torch.equal(one.dense_x, zero.dense_x)
    empty = batch(0, True)  # every bag empty: the pooled embeddings are zeros
    assert empty.sparse.indices.numel() == 0 and (empty.sparse.offsets == 0).all()
    assert torch.equal(empty.dense_x, batch(5, True).dense_x)


def test_random_bags_of_narrow_tables_are_not_padded_to_a_wide_tables_width(monkeypatch):
    """Consecutive tables share one padded matrix of bags only while padding costs little (or the matrix is
    small): three-row tables beside a million-row one with up to 1000 ids per bag are padded to 3, not 1000."""
    from dlrmkit import kernels as native_kernels

    if not native_kernels.pcg64_native():
        pytest.skip(f"no native kernels: {native_kernels.status()}")
    calls = []
    uniform_bags = native_kernels.uniform_bags

    def recorded(sizes, bags_per_table, states, inc, rows, width, pad):
        calls.append((len(rows), width))
        return uniform_bags(sizes, bags_per_table, states, inc, rows, width, pad)

    monkeypatch.setattr(native_kernels, "uniform_bags", recorded)
    config = dlrm_data.RandomDataConfig(num_indices_per_lookup=1000)
    dlrm_data.RandomDataset(2, [3] * 4 + [10**6] + [3] * 2, 512, 512, config=config)[0]
    assert [tables for tables, _ in calls] == [4, 1, 2] and calls[0][1] == calls[2][1] == 3 and calls[1][1] > 900
    calls.clear()
    dlrm_data.RandomDataset(2, [10**6] * 26, 4, 1, config=config)[0]  # a batch of one: one small matrix
    assert [tables for tables, _ in calls] == [26]
    calls.clear()
    dlrm_data.RandomDataset(2, [10**6, 2**40, 10**6], 4, 1, config=config)[0]  # int64 ids only where needed
    assert [tables for tables, _ in calls] == [1, 1, 1]


def test_random_tables_need_a_row_and_bags_no_fewer_than_none():
    for tables in ([0, 5], [2**63, 5]):
        with pytest.raises(ValueError, match="every table needs 1 to"):
            dlrm_data.RandomDataset(2, tables, 4, 4)
    with pytest.raises(ValueError, match="-2 ids per lookup"):
        dlrm_data.RandomDataset(2, [5], 4, 4, config=dlrm_data.RandomDataConfig(num_indices_per_lookup=-2))


def test_batches_from_tables_copy_their_inputs_and_refuse_lists_that_differ():
    ids = np.arange(3)
    batch = dlrm_data.batch_from_tables(np.zeros((3, 2)), [np.ones(3, np.int64)], [ids[::-1]], np.zeros(3))
    ids[:] = 7
    assert batch.indices.tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="2 tables of lengths, 1 of indices"):
        dlrm_data.batch_from_tables(np.zeros((3, 2)), [np.ones(3, np.int64)] * 2, [np.arange(6)], np.zeros(3))


def reference_random_batch(dataset, j):
    """Batch j of a RandomDataset as its docstring describes it, drawn naively in stream order from
    np.random.default_rng([seed, split, j]): dense features, then each table's bag sizes and ids, then targets."""
    cfg, n = dataset.config, dataset.samples_in_batch(j)
    rng = np.random.default_rng([dataset.seed, dataset.split, j])
    dense = rng.random((n, dataset.dense_dim), dtype=np.float32)
    lengths, indices = [], []
    for rows in dataset.table_sizes:
        if cfg.num_indices_per_lookup_fixed:
            sizes = [cfg.num_indices_per_lookup] * n
        else:
            sizes = [round(max(1.0, u * min(rows, cfg.num_indices_per_lookup))) for u in rng.random(n)]
        if cfg.distribution == "uniform":
            draws = [float(np.rint(u * (rows - 1))) for u in rng.random(sum(sizes))]
        else:
            mu = (cfg.rand_max + cfg.rand_min) / 2.0 if cfg.rand_mu == -1 else cfg.rand_mu
            draws = list(np.clip(rng.normal(mu, cfg.rand_sigma, sum(sizes)), cfg.rand_min, cfg.rand_max))
        start = 0
        for size in sizes:  # the original's np.unique of the bag's values, then its cast to integers
            bag = [int(d) for d in sorted(set(draws[start:start + size]))]
            lengths.append(len(bag))
            indices.extend(bag)
            start += size
    target = rng.random((n, 1), dtype=np.float32)
    return dense, lengths, indices, np.round(target) if cfg.round_targets else target


@pytest.mark.parametrize("kernels", ["native", "numpy"])
def test_random_batches_are_the_documented_draws_on_any_number_of_threads(kernels, monkeypatch):
    """Dense features, bag sizes, ids and targets come from the batch's NumPy stream in the documented order,
    whether the native kernels draw the dense features and the uniform ids (on one or more threads, each thread
    from its own place in the stream) or NumPy does."""
    from dlrmkit import kernels as native_kernels

    if kernels == "numpy":
        monkeypatch.setattr(native_kernels, "_library", lambda: (None, "off in this test"))
    elif not native_kernels.native():
        pytest.skip(f"no native kernels: {native_kernels.status()}")
    monkeypatch.setattr(native_kernels, "RANDOM_OPENMP_MIN_WORDS", 1)  # threads even for these small batches
    cases = [  # dense_dim, tables, samples, batch size, config
        (13, [1000, 7, 1, 2**31, 2**40], 75, 37, dict(num_indices_per_lookup=6)),  # odd dense draws: a half word kept
        (4, [50, 3], 20, 8, dict(num_indices_per_lookup=5, num_indices_per_lookup_fixed=True, round_targets=True)),
        (3, [100, 9], 9, 9, dict(distribution="gaussian", rand_min=0, rand_max=8.5, rand_sigma=20)),  # clipped
        (3, [100, 9], 9, 9, dict(distribution="gaussian", rand_min=0, rand_max=2, rand_sigma=1,  # repeated ids
                                 num_indices_per_lookup=8, num_indices_per_lookup_fixed=True)),
        (5, [30, 2**33], 16, 16, dict(num_indices_per_lookup=40)),  # bags of up to the table's size
    ]
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for dense_dim, tables, samples, batch_size, config in cases:
                dataset = dlrm_data.RandomDataset(dense_dim, tables, samples, batch_size, seed=11, split=2,
                                                  config=dlrm_data.RandomDataConfig(**config))
                for j in range(len(dataset)):
                    batch = dataset[j]
                    dense, lengths, indices, target = reference_random_batch(dataset, j)
                    assert np.array_equal(batch.dense_x.numpy(), dense) and np.array_equal(batch.target.numpy(), target)
                    assert batch.sparse.lengths().tolist() == lengths and batch.indices.tolist() == indices
                    assert batch.indices.dtype == batch.offsets.dtype == torch.int64
    finally:
        torch.set_num_threads(previous)


def test_data_notes_come_from_one_process_of_a_distributed_run(monkeypatch, capsys):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    dlrm_data._note("note: from rank 1")
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    dlrm_data._note("note: from rank 0")
    assert capsys.readouterr().err == "note: from rank 0\n"
