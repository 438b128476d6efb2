"""Preprocessing: ids, splits, sub-sampling, caching, resume, the original's .npz."""

import gzip
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data_utils
import dlrm_s_pytorch as dlrm
from conftest import CRITEO_SAMPLE, ROOT
from helpers import (MISSING, fake_kaggle, fake_terabyte, load_days, naive_ids, naive_key, naive_row,
                     preprocess_quietly, row_text)


@pytest.mark.skipif(not os.path.exists(CRITEO_SAMPLE), reason="no ../shared/data/criteo_sample.tsv")
@pytest.mark.parametrize("max_ind_range", [-1, 100])
def test_real_rows_end_up_as_the_naive_reference(tmp_path, max_ind_range):
    processed, _ = preprocess_quietly(CRITEO_SAMPLE, tmp_path / "out", max_ind_range=max_ind_range)
    expected = [naive_row(line) for line in open(CRITEO_SAMPLE, "rb")]
    expected_ids, counts = naive_ids([e[2] for e in expected], max_ind_range)
    label, dense, sparse = load_days(processed)
    np.testing.assert_array_equal(label, [e[0] for e in expected])
    np.testing.assert_array_equal(dense, [e[1] for e in expected])
    np.testing.assert_array_equal(sparse, expected_ids)
    assert processed.counts == counts
    if max_ind_range > 0:  # some features fill the range, plus missing
        assert max(counts) <= max_ind_range + 1 and max(counts) >= max_ind_range
    for t in range(26):  # the dictionary says which key each id stands for
        dictionary = np.load(os.path.join(processed.out_dir, f"dictionary_{t}.npy"))
        keys = [naive_key(e[2][t], max_ind_range) for e in expected]
        np.testing.assert_array_equal(dictionary[sparse[:, t]], keys)


def test_same_value_gets_the_same_id_on_every_day_and_missing_its_own(tmp_path):
    rows = [row_text(k % 2, cats=["0000000a" if k % 3 else None] + ["%08x" % (k % 5)] * 25) for k in range(70)]
    (tmp_path / "train.txt").write_bytes(b"".join(rows))
    processed, _ = preprocess_quietly(str(tmp_path / "train.txt"), tmp_path / "out")
    _, _, sparse = load_days(processed)
    first = sparse[:, 0]
    assert processed.counts[0] == 2 and processed.counts[1] == 5
    assert len(set(first[[k for k in range(70) if k % 3]])) == 1 and first[0] != first[1]
    np.testing.assert_array_equal(sparse[:, 1], [k % 5 for k in range(70)])  # first appearance order


def test_kaggle_split_sizes(tmp_path):
    raw = fake_kaggle(tmp_path, 1003)
    processed, _ = preprocess_quietly(raw, tmp_path / "out")
    assert processed.day_rows == [144, 144, 143, 143, 143, 143, 143]  # 1003 = 7 * 143 + 2
    splits = data_utils.split_days(processed.day_rows)
    assert splits == {"train": [(d, 0, processed.day_rows[d]) for d in range(6)],
                      "test": [(6, 0, 72)], "val": [(6, 72, 143)]}
    meta = json.load(open(tmp_path / "out" / "kaggle-dictionary" / "metadata.json"))
    assert meta["splits"]["test"] == [[6, 0, 72]] and meta["counts"] == processed.counts
    # the days are the consecutive lines of the file
    lines = open(raw, "rb").readlines()
    label, _, _ = load_days(processed)
    np.testing.assert_array_equal(label, [naive_row(line)[0] for line in lines])


def test_terabyte_split_sizes_with_plain_and_gzip_days(tmp_path):
    prefix = fake_terabyte(tmp_path, 24 * 20 + 9, seed=1)
    for day in (0, 5, 23):  # some days compressed, as downloaded
        with open(f"{prefix}_{day}", "rb") as f:
            data = f.read()
        os.remove(f"{prefix}_{day}")
        with gzip.open(f"{prefix}_{day}.gz", "wb") as f:
            f.write(data)
    processed, _ = preprocess_quietly(prefix, tmp_path / "out", "terabyte")
    assert processed.day_rows == [21] * 9 + [20] * 15
    assert data_utils.split_days(processed.day_rows)["test"] == [(23, 0, 10)]
    assert data_utils.split_days(processed.day_rows)["val"] == [(23, 10, 20)]
    assert len(data_utils.split_days(processed.day_rows)["train"]) == 23


def test_sub_sampling_drops_training_negatives_only(tmp_path):
    raw = fake_kaggle(tmp_path, 7000)
    full, _ = preprocess_quietly(raw, tmp_path / "full")
    sub, _ = preprocess_quietly(raw, tmp_path / "sub", sub_sample_rate=0.6)
    full_label = [np.load(full.day_file(d, "label")) for d in range(7)]
    sub_label = [np.load(sub.day_file(d, "label")) for d in range(7)]
    for d in range(6):
        assert sub_label[d].sum() == full_label[d].sum()  # every click kept
        negatives, kept = (full_label[d] == 0).sum(), (sub_label[d] == 0).sum()
        assert abs(kept / negatives - 0.4) < 0.1
    np.testing.assert_array_equal(sub_label[6], full_label[6])  # test and validation day untouched
    np.testing.assert_array_equal(np.load(sub.day_file(6, "sparse")).shape, np.load(full.day_file(6, "sparse")).shape)
    again, _ = preprocess_quietly(raw, tmp_path / "again", sub_sample_rate=0.6)
    assert again.day_rows == sub.day_rows  # a fixed choice, not a fresh draw


def test_rerun_reuses_matching_output_and_rebuilds_when_the_raw_file_changes(tmp_path):
    raw = fake_kaggle(tmp_path, 700)
    out = tmp_path / "out" / "kaggle-dictionary"
    _, messages = preprocess_quietly(raw, tmp_path / "out")
    assert any(m.startswith("Preprocessing kaggle") and m.endswith(f"-> {out} (dictionary ids, 1 process)")
               for m in messages)
    mtime = os.path.getmtime(out / "day_0_sparse.npy")
    _, messages = preprocess_quietly(raw, tmp_path / "out")
    assert messages == [f"Reading pre-processed data={out}"] and os.path.getmtime(out / "day_0_sparse.npy") == mtime

    with open(raw, "ab") as f:  # the raw data changed
        f.write(row_text(1))
    rebuilt, messages = preprocess_quietly(raw, tmp_path / "out")
    assert messages[0] == f"Rebuilding processed data in {out}: raw file train.txt changed (size or modification time)"
    assert sum(d["lines"] for d in rebuilt.metadata["days"]) == 701


def test_each_setting_keeps_its_own_processed_set_and_switching_back_reuses_it(tmp_path):
    raw = fake_kaggle(tmp_path, 700)
    base = tmp_path / "out"
    sets = {(-1, 0.0): "kaggle-dictionary", (50, 0.0): "kaggle-hash50", (40, 0.0): "kaggle-hash40",
            (50, 0.5): "kaggle-hash50-sub0.5"}
    for (max_ind_range, rate), name in sets.items():
        processed, messages = preprocess_quietly(raw, base, max_ind_range=max_ind_range, sub_sample_rate=rate)
        assert processed.out_dir == str(base / name) and any(m.startswith("Preprocessing kaggle") for m in messages)
    mtimes = {name: os.path.getmtime(base / name / "day_0_sparse.npy") for name in sets.values()}
    for (max_ind_range, rate), name in reversed(list(sets.items())):  # alternating never rebuilds
        processed, messages = preprocess_quietly(raw, base, max_ind_range=max_ind_range, sub_sample_rate=rate)
        assert messages == [f"Reading pre-processed data={base / name}"]
        assert max(processed.counts) <= max(max_ind_range, 0) + 1 or max_ind_range < 0
    assert {name: os.path.getmtime(base / name / "day_0_sparse.npy") for name in sets.values()} == mtimes


@pytest.mark.slow
def test_the_trainer_says_which_processed_set_it_uses(tmp_path, run_main):
    raw = fake_kaggle(tmp_path, 1400)
    flags = ["--data-generation=dataset", f"--raw-data-file={raw}", "--arch-mlp-bot=13-4-2", "--mini-batch-size=64",
             "--num-batches=2", f"--processed-data-file={tmp_path / 'terabyte_processed.npz'}"]
    for max_ind_range in (100, 200, 100):
        code, out, err = run_main(*flags, f"--max-ind-range={max_ind_range}")
        assert code == 0, err
    assert f"Reading pre-processed data={tmp_path / 'terabyte_processed' / 'kaggle-hash100'}" in out
    assert "Preprocessing" not in out


def test_a_single_set_of_an_earlier_version_is_moved_or_removed(tmp_path):
    raw = fake_kaggle(tmp_path, 700)
    fresh, _ = preprocess_quietly(raw, tmp_path / "fresh")
    for max_ind_range in (-1, 50):
        built, _ = preprocess_quietly(raw, tmp_path / "old", max_ind_range=max_ind_range)
        base = tmp_path / "old"
        for name in os.listdir(built.out_dir):  # the earlier layout: one set directly in the base directory
            os.replace(os.path.join(built.out_dir, name), base / name)
        os.rmdir(built.out_dir)
        meta = json.load(open(base / "metadata.json"))
        meta["settings"]["format"] = "dlrm-criteo-processed-v1"
        (base / "metadata.json").write_text(json.dumps(meta))
        if max_ind_range > 0:  # its ids are stale: without the raw data nothing is removed
            with pytest.raises(data_utils.DataError, match="written by an earlier version and is not used"):
                preprocess_quietly(str(tmp_path / "gone.txt"), base, max_ind_range=max_ind_range)
            assert (base / "metadata.json").exists()
        processed, messages = preprocess_quietly(raw, base)
        if max_ind_range < 0:  # dictionary ids are still valid: moved, not rebuilt
            assert messages == [f"Moved the processed data in {base} into {base / 'kaggle-dictionary'} "
                                "(one directory per settings)", f"Reading pre-processed data={base / 'kaggle-dictionary'}"]
        else:
            assert messages[0].startswith(f"Removing the processed data of an earlier version in {base}: ")
        assert sorted(os.listdir(base)) == [data_utils.LOCK_FILE, "kaggle-dictionary"]
        for a, b in zip(load_days(processed), load_days(fresh)):
            np.testing.assert_array_equal(a, b)


def test_processed_data_is_used_without_the_raw_file_when_settings_match(tmp_path):
    raw = fake_kaggle(tmp_path, 700)
    preprocess_quietly(raw, tmp_path / "out")
    os.remove(raw)
    processed, messages = preprocess_quietly(raw, tmp_path / "out")
    assert "raw data not found" in messages[0] and sum(processed.day_rows) == 700
    with pytest.raises(data_utils.DataError, match=r"--max-ind-range was -1, now 9\); rebuilding it needs the raw"):
        preprocess_quietly(raw, tmp_path / "out", max_ind_range=9)


def test_an_interrupted_run_resumes_with_its_finished_days(tmp_path, monkeypatch):
    raw = fake_kaggle(tmp_path, 3500)
    clean, _ = preprocess_quietly(raw, tmp_path / "clean")

    real_parse = data_utils.parse_block
    calls = []

    def parse_then_die(raw_bytes, path, first_line):
        if first_line > 3 * 500:  # killed while parsing day 3
            raise KeyboardInterrupt
        calls.append(first_line)
        return real_parse(raw_bytes, path, first_line)

    monkeypatch.setattr(data_utils, "parse_block", parse_then_die)
    with pytest.raises(KeyboardInterrupt):
        preprocess_quietly(raw, tmp_path / "out")
    out = tmp_path / "out" / "kaggle-dictionary"
    assert not (out / "metadata.json").exists()
    assert sorted(p.name for p in (out / "work").glob("*.parsed.json")) == [f"day_{d}.parsed.json" for d in range(3)]
    assert not list(out.rglob("*.tmp"))  # the unfinished day's files were discarded
    # what a hard kill would leave behind: half-written files under temporary names
    (out / "day_3_label.npy.tmp").write_bytes(b"\x93NUMPY half")
    (out / "work" / "day_3_local.npy.tmp").write_bytes(b"garbage")

    monkeypatch.setattr(data_utils, "parse_block", real_parse)
    calls.clear()
    resumed, messages = preprocess_quietly(raw, out.parent)
    assert "Resuming: 3 of 7 days already parsed" in messages
    for d in range(7):
        for kind in ("label", "dense", "sparse"):
            np.testing.assert_array_equal(np.load(resumed.day_file(d, kind)), np.load(clean.day_file(d, kind)))
    assert resumed.counts == clean.counts
    assert not (out / "work").exists() and not list(out.rglob("*.tmp"))


def test_unfinished_work_survives_other_settings_and_is_discarded_when_the_raw_file_changes(tmp_path, monkeypatch):
    raw = fake_kaggle(tmp_path, 700)
    monkeypatch.setattr(data_utils, "_number_feature", lambda job, report: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        preprocess_quietly(raw, tmp_path / "out")
    monkeypatch.undo()
    processed, messages = preprocess_quietly(raw, tmp_path / "out", max_ind_range=7)
    assert not any(m.startswith(("Discarding", "Resuming")) for m in messages)
    assert max(processed.counts) <= 8 and np.load(processed.day_file(0, "sparse")).max() < 8  # 7 hashed + missing
    monkeypatch.setattr(data_utils, "_number_feature", lambda job, report: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # the dictionary run resumed its parsed days, then stopped again
        preprocess_quietly(raw, tmp_path / "out")
    monkeypatch.undo()
    with open(raw, "ab") as f:
        f.write(row_text(1))
    _, messages = preprocess_quietly(raw, tmp_path / "out")
    assert any(m.startswith("Discarding unfinished preprocessing") and m.endswith("changed (size or modification time)")
               for m in messages)


def test_multiprocessing_gives_the_same_result(tmp_path):
    raw = fake_kaggle(tmp_path, 1400)
    one, _ = preprocess_quietly(raw, tmp_path / "one")
    many, _ = preprocess_quietly(raw, tmp_path / "many", workers=2)
    assert one.counts == many.counts
    for a, b in zip(load_days(one), load_days(many)):
        np.testing.assert_array_equal(a, b)


def test_original_npz_is_read(tmp_path, run_main):
    rng = np.random.default_rng(0)
    n = 700
    X_int = rng.integers(-2, 1000, (n, 13)).astype(np.int32)
    X_cat = rng.integers(0, 40, (n, 26)).astype(np.int32)
    y = (rng.random(n) < 0.3).astype(np.int32)
    path = tmp_path / "kaggleAdDisplayChallenge_processed.npz"
    np.savez_compressed(path, X_int=X_int, X_cat=X_cat, y=y, counts=np.full(26, 40, dtype=np.int32))
    args = dlrm.parse_args(["--data-generation=dataset", f"--processed-data-file={path}", "--mini-batch-size=100",
                            "--data-randomize=none", "--max-ind-range=30"])
    train, test, dense_dim, table_sizes = dlrm.make_datasets(args)
    assert table_sizes == [30] * 26 and dense_dim == 13
    assert len(train) == 6 and test.num_rows == 50  # days of 100; day 6 halved
    batch = train[1]
    expected_dense = np.log(np.maximum(X_int[100:200], 0).astype(np.float32) + 1)
    np.testing.assert_allclose(batch.dense_x.numpy(), expected_dense, rtol=1e-6)
    np.testing.assert_array_equal(batch.lS_i[3].numpy(), X_cat[100:200, 3] % 30)
    np.testing.assert_array_equal(batch.target.numpy().ravel(), y[100:200])
    code, out, err = run_main("--data-generation=dataset", f"--processed-data-file={path}", "--arch-mlp-bot=13-4-2",
                              "--mini-batch-size=64", "--test-freq=5", "--loss-function=bce")
    assert code == 0, err
    assert "Reading the original's processed data" in out and ", auc=0." in out


def damaged_original_npz(path, kind):
    rng = np.random.default_rng(0)
    arrays = dict(X_int=rng.integers(0, 100, (70, 13)).astype(np.int32), X_cat=rng.integers(0, 9, (70, 26)),
                  y=rng.integers(0, 2, 70), counts=np.full(26, 9))
    if kind == "few counts":
        arrays["counts"] = arrays["counts"][:20]
    if kind == "12 integers":
        arrays["X_int"] = arrays["X_int"][:, :12]
    np.savez_compressed(path, **arrays)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("kind,message", [
    ("truncated", "not a readable .npz (BadZipFile"),
    ("few counts", "counts (20,) should hold one table size per categorical column (26)"),
    ("12 integers", "do not fit together (rows of 13 integers and 26 categoricals)"),
])
def test_a_damaged_original_npz_stops_with_one_line_naming_it(tmp_path, run_main, kind, message):
    path = damaged_original_npz(tmp_path / "kaggleAdDisplayChallenge_processed.npz", kind)
    code, out, err = run_main("--data-generation=dataset", f"--processed-data-file={path}", "--arch-mlp-bot=13-4-2")
    assert code == 1 and err.startswith(f"dlrm_s_pytorch.py: error: --processed-data-file {path}: ")
    assert message in err and len(err.splitlines()) == 1 and "Finished" not in out


def test_fake_generator_is_deterministic_and_chunking_free(tmp_path):
    a = data_utils.format_rows(*data_utils.fake_rows(50, seed=3, first_row=0))
    b = data_utils.format_rows(*data_utils.fake_rows(50, seed=3, first_row=0))
    assert a == b and a.count(b"\n") == 50
    assert all(len(line.split(b"\t")) == 40 for line in a.splitlines())


@pytest.mark.parametrize("groups,piece", [(1, 10_000), (8, 10_000), (64, 777)])
def test_numbering_gives_each_distinct_value_one_dense_id_across_pieces(groups, piece):
    rng = np.random.default_rng(groups)
    values = (rng.random(10_000) ** 3 * 3000).astype(np.int64) * 7919 + (1 << 32) * (rng.random(10_000) < 0.01)
    numbering = data_utils.Numbering(groups)
    ids = np.concatenate([numbering.add(values[k : k + piece]) for k in range(0, len(values), piece)])
    dictionary = numbering.dictionary()
    assert numbering.count == len(dictionary) == len(np.unique(values))
    np.testing.assert_array_equal(dictionary[ids], values)  # same value, same id; the dictionary inverts it
    assert np.array_equal(np.sort(np.unique(ids)), np.arange(numbering.count))


def test_damaged_processed_files_are_rebuilt(tmp_path):
    raw = fake_kaggle(tmp_path, 700)
    processed, _ = preprocess_quietly(raw, tmp_path / "out")
    path = processed.day_file(2, "sparse")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 104)
    rebuilt, messages = preprocess_quietly(raw, tmp_path / "out")
    assert messages[0].startswith(f"Rebuilding processed data in {tmp_path / 'out' / 'kaggle-dictionary'}: "
                                  "day_2_sparse.npy: ")  # the damaged file named
    assert np.load(rebuilt.day_file(2, "sparse")).shape == (100, 26)


def test_missing_keeps_an_id_of_its_own_under_hashing_in_every_output(tmp_path):
    # 2**32 % 1000 == 0x128 % 1000: hashing missing like a value would merge it with 00000128
    c1 = ["00000128", "00000001", None]
    rows = [row_text(k % 2, cats=[c1[k % 3]] + ["0000000a"] * 25) for k in range(70)]
    (tmp_path / "train.txt").write_bytes(b"".join(rows))
    processed, _ = preprocess_quietly(str(tmp_path / "train.txt"), tmp_path / "out", max_ind_range=1000)
    _, _, sparse = load_days(processed)
    assert processed.counts[0] == 3 and processed.counts[1] == 1
    ids = {value: set(sparse[k % 3 :: 3, 0].tolist()) for k, value in enumerate(c1)}
    assert all(len(v) == 1 for v in ids.values()) and len(set.union(*ids.values())) == 3
    dictionary = np.load(os.path.join(processed.out_dir, "dictionary_0.npy"))
    assert sorted(dictionary.tolist()) == [1, 0x128, MISSING]
    records = {}
    for split, path in data_utils.write_bin_files(processed, log=lambda *a: None).items():
        records[split] = np.fromfile(path, dtype=np.int32).reshape(-1, 40)
    np.testing.assert_array_equal(np.concatenate([records[s][:, 14:] for s in ("train", "test", "val")]), sparse)


@settings(max_examples=40, deadline=None)
@given(max_ind_range=st.integers(1, 1 << 33),
       values=st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=30),
       missing_every=st.integers(1, 5))
def test_hashed_ids_property(max_ind_range, values, missing_every):
    """Missing never shares an id with a present value; two distinct values share one only when equal mod M."""
    cats = ["%08x" % v for v in values]
    for k in range(0, len(cats) + 1, missing_every):
        cats.insert(k, None)
    raw = b"".join(row_text(0, cats=[c] * 26) for c in cats)
    parsed = data_utils.parse_block(raw, "rows", 1)
    ids = data_utils.Numbering().add(data_utils.categorical_keys(parsed.categorical[0], max_ind_range))
    present = [c is not None for c in cats]
    missing_ids = {int(i) for i, p in zip(ids, present) if not p}
    assert len(missing_ids) == 1 and not missing_ids & {int(i) for i, p in zip(ids, present) if p}
    id_of = {v: int(i) for v, i, p in zip(parsed.categorical[0].tolist(), ids, present) if p}
    for a in id_of:
        for b in id_of:
            assert (id_of[a] == id_of[b]) == (a % max_ind_range == b % max_ind_range)


def test_two_raw_files_in_one_folder_keep_their_own_processed_sets(tmp_path):
    """Without --processed-data-file, each raw file's processed set sits next to it under its own name."""
    first, second = str(tmp_path / "clicks_a.txt"), str(tmp_path / "clicks_b.txt")
    data_utils.make_fake(first, 300, seed=1, log=lambda *a: None)
    data_utils.make_fake(second, 300, seed=2, log=lambda *a: None)
    messages = []
    for raw in (first, second, first, second):
        _, said = preprocess_quietly(raw, data_utils.processed_dir("", raw, "kaggle"))
        messages.append(" ".join(said))
    assert all("Reading pre-processed" in m for m in messages[2:]) and not any("Rebuilding" in m for m in messages)
    assert data_utils.processed_dir("", str(tmp_path / "clicks_a.txt"), "kaggle") == str(tmp_path / "clicks_a.txt_processed")
    # names that differ only in their extension (or in having one) keep their own sets too
    assert len({data_utils.processed_dir("", f"input/clicks{ext}", "kaggle") for ext in ("", ".txt", ".tsv")}) == 3
    assert data_utils.processed_dir("", "input/train.txt", "kaggle") == "input/kaggleAdDisplayChallenge_processed"
    assert data_utils.processed_dir("", "input/day", "terabyte") == "input/terabyte_processed"


WORKER_SCRIPT = """
import multiprocessing, sys
sys.path[:0] = [{root!r}, {tests!r}]
import data_utils
import helpers

class Bar:
    def update(self, n):
        pass

if __name__ == "__main__":
    multiprocessing.set_start_method({method!r})
    data_utils.run_tasks(helpers.write_job_file_and_wait, {jobs!r}, 2, Bar())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_preprocessing_workers_die_with_their_parent(tmp_path, method):
    files = [tmp_path / "worker0", tmp_path / "worker1"]
    script = WORKER_SCRIPT.format(root=ROOT, tests=os.path.dirname(__file__), method=method, jobs=list(map(str, files)))
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while not all(f.exists() and f.read_text() for f in files) and time.time() < deadline:
        time.sleep(0.05)
    workers = [int(f.read_text()) for f in files]
    parent.kill()
    parent.wait()

    def running(pid):  # neither gone nor a zombie waiting to be reaped
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.05)
    alive = [pid for pid in workers if running(pid)]
    for pid in alive:
        os.kill(pid, 9)
    assert alive == []


POOL_SCRIPT = """
import multiprocessing, sys
sys.path[:0] = [{root!r}, {tests!r}]
import data_utils
import helpers

class Bar:
    total = 0

    def update(self, n):
        Bar.total += n

if __name__ == "__main__":
    multiprocessing.set_start_method({method!r})
    data_utils.run_tasks(helpers.write_job_file, {jobs!r}, 2, Bar())
    print(Bar.total)
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "forkserver"])  # fork: the other tests
def test_preprocessing_pools_run_under_every_start_method(tmp_path, method):
    script = tmp_path / "pool.py"
    jobs = [str(tmp_path / f"job{k}") for k in range(3)]
    script.write_text(POOL_SCRIPT.format(root=ROOT, tests=os.path.dirname(__file__), method=method, jobs=jobs))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(os.path.exists(job) for job in jobs) and result.stdout.split() == ["3"]


@pytest.mark.parametrize("total_per_file,message", [
    (np.array([[35, 35], [0, 0]]), "total_per_file should be the rows of each day (integers, none negative)"),
    (np.array(70), "total_per_file should be the rows of each day"),
    (np.array([80, -10]), "total_per_file should be the rows of each day"),
    (np.array([35.0, 35.0]), "total_per_file should be the rows of each day"),
    (np.array([70]), "kaggle data has 7 days, the last one the test day (not empty); found 1 day counts, the last 70"),
    (np.array([70, 0, 0, 0, 0, 0, 0]), "kaggle data has 7 days, the last one the test day (not empty); found 7"),
])
def test_a_damaged_day_count_file_stops_with_one_line_naming_it(tmp_path, run_main, total_per_file, message):
    path = damaged_original_npz(tmp_path / "kaggleAdDisplayChallenge_processed.npz", "good")
    np.savez(tmp_path / "train_day_count.npz", total_per_file=total_per_file)
    code, out, err = run_main("--data-generation=dataset", f"--processed-data-file={path}", "--arch-mlp-bot=13-4-2",
                              f"--raw-data-file={tmp_path / 'train.txt'}")
    assert code == 1 and f"{tmp_path / 'train_day_count.npz'}: {message}" in err and len(err.splitlines()) == 1


@pytest.fixture
def terabyte_set(tmp_path):
    """(raw prefix, processed base folder, ProcessedData) of 24 small fake days."""
    os.makedirs(tmp_path / "raw")
    prefix = fake_terabyte(tmp_path / "raw", 24 * 20, seed=2)
    processed, _ = preprocess_quietly(prefix, tmp_path / "out", "terabyte")
    return prefix, tmp_path / "out", processed


@pytest.mark.slow
def test_naming_one_sets_own_folder_reads_that_set_and_never_removes_it(terabyte_set):
    prefix, base, processed = terabyte_set
    files = sorted(os.listdir(processed.out_dir)) + [data_utils.LOCK_FILE]  # a lock file joins: runs take turns
    for raw in (prefix, ""):
        again, messages = preprocess_quietly(raw, processed.out_dir, "terabyte")
        assert again.out_dir == processed.out_dir and messages[0].startswith(f"Reading pre-processed data={again.out_dir}")
    assert sorted(os.listdir(processed.out_dir)) == sorted(files)  # no set removed, none nested inside
    with pytest.raises(data_utils.DataError, match=r"holds the processed set of other settings \(--max-ind-range was "
                                                   r"-1, now 100\); name the folder above it"):
        preprocess_quietly(prefix, processed.out_dir, "terabyte", max_ind_range=100)
    assert sorted(os.listdir(processed.out_dir)) == sorted(files)


def test_a_processed_set_stands_when_some_raw_days_are_removed(terabyte_set):
    prefix, base, processed = terabyte_set
    for day in range(4):  # freeing disk space, day by day
        os.remove(f"{prefix}_{day}")
    again, messages = preprocess_quietly(prefix, base, "terabyte")
    assert again.metadata == processed.metadata
    assert messages == [f"Reading pre-processed data={processed.out_dir} (not checked against the raw data: "
                        f"--raw-data-file {prefix}: day file {prefix}_0 (or .gz) not found (--data-set=terabyte reads "
                        "the 24 day files <prefix>_0 .. <prefix>_23))"]
    with pytest.raises(data_utils.DataError, match="day file .*_0 \\(or .gz\\) not found"):  # other settings: a build
        preprocess_quietly(prefix, base, "terabyte", max_ind_range=50)


def test_empty_training_days_are_days_without_rows_and_an_empty_test_day_is_refused(tmp_path):
    prefix = fake_terabyte(tmp_path, 24 * 20, seed=2)
    open(f"{prefix}_7", "wb").close()
    processed, _ = preprocess_quietly(prefix, tmp_path / "out", "terabyte")
    assert processed.day_rows == [20] * 7 + [0] + [20] * 16
    assert data_utils.split_days(processed.day_rows)["train"][7] == (7, 0, 0)
    open(f"{prefix}_23", "wb").close()
    with pytest.raises(data_utils.DataError, match=r"day_23: empty file \(no rows\); the last day holds the test"):
        preprocess_quietly(prefix, tmp_path / "out", "terabyte")
    for day in range(23):
        open(f"{prefix}_{day}", "wb").close()
    with open(f"{prefix}_23", "wb") as f:
        f.write(row_text(1) * 3)
    with pytest.raises(data_utils.DataError, match=r"day_0 \.\. day_22: every training day is empty"):
        preprocess_quietly(prefix, tmp_path / "out", "terabyte")


@pytest.mark.slow
def test_bin_files_of_the_wrong_size_are_rewritten_and_a_failed_write_is_one_line(terabyte_set, monkeypatch):
    _, _, processed = terabyte_set
    messages = []
    paths = data_utils.write_bin_files(processed, log=messages.append)
    whole = open(paths["train"], "rb").read()
    assert len(whole) == 4 * data_utils.NUM_FIELDS * 23 * 20
    with open(paths["train"], "r+b") as f:
        f.truncate(len(whole) - 160)  # damaged: a cut copy
    messages.clear()
    data_utils.write_bin_files(processed, log=messages.append)
    assert messages[0] == (f"Rewriting the --mlperf-bin-loader files: {paths['train']} holds {len(whole) - 160} "
                           f"bytes, not the {len(whole)} of its rows")
    assert open(paths["train"], "rb").read() == whole
    os.remove(paths["test"])

    def full_disk(src, dst):
        raise OSError(28, "No space left on device", src)

    monkeypatch.setattr(data_utils.os, "replace", full_disk)
    with pytest.raises(data_utils.DataError, match=r"writing the --mlperf-bin-loader files into .* failed: "
                                                   r".*train\.bin\.tmp: No space left on device"):
        data_utils.write_bin_files(processed, log=messages.append)
    assert not [name for name in os.listdir(processed.out_dir) if name.endswith(".tmp")]


def test_the_originals_terabyte_npz_is_cut_by_its_day_counts_only(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "terabyte_processed.npz"
    np.savez(path, X_int=rng.integers(0, 9, (130, 13)), X_cat=rng.integers(0, 9, (130, 26)),
             y=rng.integers(0, 2, 130), counts=np.full(26, 9))
    with pytest.raises(data_utils.DataError, match="Terabyte data is cut into its days by the original's day counts "
                                                   r"\(<prefix>_day_count.npz beside the raw day files\), not found"):
        data_utils.load_original_npz(str(path), "", "terabyte")
    days = [5] * 23 + [15]
    np.savez(tmp_path / "day_day_count.npz", total_per_file=np.array(days))
    assert data_utils.load_original_npz(str(path), str(tmp_path / "day"), "terabyte")[4] == days
    np.savez(tmp_path / "day_day_count.npz", total_per_file=np.array([5] * 24))
    with pytest.raises(data_utils.DataError, match=r"day_day_count.npz: its days hold 120 rows, .* holds 130: the day "
                                                   "counts of other data"):
        data_utils.load_original_npz(str(path), str(tmp_path / "day"), "terabyte")


def test_the_originals_memory_map_output_is_named_when_the_raw_data_is_gone(tmp_path):
    for day in range(24):
        (tmp_path / f"day_{day}_reordered.npz").write_bytes(b"")
    for name in ("day_fea_count.npz", "train_day_0_reordered.npz", "train_fea_count.npz"):
        (tmp_path / name).write_bytes(b"")
    assert data_utils.missing_raw_data(str(tmp_path / "day"), "terabyte") == (
        f"--raw-data-file {tmp_path / 'day'}: day file {tmp_path / 'day'}_0 (or .gz) not found; "
        f"{tmp_path / 'day_0_reordered.npz'} .. day_23_reordered.npz are the original's --memory-map output: add "
        "--memory-map to read them")
    assert data_utils.missing_raw_data(str(tmp_path / "train.txt"), "kaggle") == (
        f"--raw-data-file {tmp_path / 'train.txt'}: no such file; the original's --memory-map output beside it is "
        f"incomplete ({tmp_path / 'train_day_1_reordered.npz'} not found)")
    (tmp_path / "day_0_reordered.npz").unlink()  # any day of them: named
    assert data_utils.missing_raw_data(str(tmp_path / "day"), "terabyte").endswith(
        f"the original's --memory-map output beside it is incomplete ({tmp_path / 'day_0_reordered.npz'} not found)")
    (tmp_path / "day_fea_count.npz").unlink()  # the table sizes of the original's .bin files are not its output
    assert "memory-map" not in data_utils.missing_raw_data(str(tmp_path / "other"), "terabyte")


def test_the_originals_kaggle_npz_without_day_counts_is_cut_equally_only_without_sub_sampling(tmp_path):
    path = damaged_original_npz(tmp_path / "kaggleAdDisplayChallenge_processed.npz", "none")
    notes = []
    days = data_utils.load_original_npz(str(path), "", "kaggle", note=notes.append)[4]
    assert days == [10] * 7 and notes == [
        f"note: {path}: without the original's day counts (<raw name>_day_count.npz beside the raw train.txt, given "
        "--raw-data-file) its 70 rows are cut into 7 equal days, as the original cut train.txt: right for data "
        "processed without --data-sub-sample-rate"]
    with pytest.raises(data_utils.DataError, match=re.escape(
            f"--processed-data-file {path}: the original's data of --data-sub-sample-rate=0.5 is cut into its days "
            f"by the original's day counts ({tmp_path / 'train_day_count.npz'}), not found; give "
            "--raw-data-file=<the raw train.txt> where that file lies")):
        data_utils.load_original_npz(str(path), str(tmp_path / "train.txt"), "kaggle", sub_sample_rate=0.5)
    np.savez(tmp_path / "train_day_count.npz", total_per_file=np.array([12, 12, 11, 11, 8, 6, 10]))
    assert data_utils.load_original_npz(str(path), str(tmp_path / "train.txt"), "kaggle", sub_sample_rate=0.5,
                                        note=notes.append)[4] == [12, 12, 11, 11, 8, 6, 10]
    assert len(notes) == 1


def test_data_utils_takes_the_originals_command_line(tmp_path, capsys):
    raw = fake_kaggle(tmp_path, 700)
    assert data_utils.main(["--data-set=kaggle", f"--raw-data-file={raw}", "--memory-map",
                            "--data-randomize=total"]) == 0
    assert "note: --memory-map has no effect on preprocessing" in capsys.readouterr().err
    assert data_utils.read_set_metadata(tmp_path / "kaggleAdDisplayChallenge_processed" / "kaggle-dictionary")


def test_two_preprocessing_runs_into_one_folder_take_turns(tmp_path):
    import fcntl
    import threading

    raw = fake_kaggle(tmp_path, 700)
    os.makedirs(tmp_path / "out")
    messages, results = [], []
    with open(tmp_path / "out" / data_utils.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process preprocessing
        worker = threading.Thread(target=lambda: results.append(data_utils.preprocess(
            raw, str(tmp_path / "out"), log=messages.append, progress=False)))
        worker.start()
        time.sleep(0.3)
        assert messages == [f"Waiting for another process preprocessing into {tmp_path / 'out'}"] and not results
        fcntl.flock(lock, fcntl.LOCK_UN)
    worker.join(60)
    assert results and messages[1].startswith("Preprocessing kaggle")


def test_bad_raw_data_leaves_no_folders_behind(tmp_path):
    raw = tmp_path / "train.txt"
    raw.write_bytes(row_text(1) * 6)
    with pytest.raises(data_utils.DataError, match="6 rows are too few to cut into 7 days"):
        preprocess_quietly(str(raw), tmp_path / "out")
    assert os.listdir(tmp_path) == ["train.txt"]  # no processed folder with unfinished work in it


def test_a_processed_set_in_a_folder_that_cannot_be_written_is_read(tmp_path, monkeypatch):
    raw = fake_kaggle(tmp_path, 700)
    processed, _ = preprocess_quietly(raw, tmp_path / "out")
    real_open = open

    def read_only(path, *args, **kwargs):  # a read-only mount: the lock file cannot be opened for writing
        if str(path).endswith(data_utils.LOCK_FILE):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    again, messages = preprocess_quietly(raw, tmp_path / "out")
    assert messages == [f"Reading pre-processed data={processed.out_dir}"]


@pytest.mark.slow
def test_sigterm_stops_make_fake_in_one_line_without_a_partial_file(tmp_path):
    import signal

    run = subprocess.Popen([sys.executable, os.path.join(ROOT, "data_utils.py"), "make-fake", "--rows=50000000",
                            f"--out={tmp_path / 'train.txt'}"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any(name.startswith(".train.txt.tmp") for name in os.listdir(tmp_path)):  # writing
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143 and err == "data_utils.py: terminated\n"
    assert os.listdir(tmp_path) == []
