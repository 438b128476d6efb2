"""Raw Criteo text: vectorised parsing against a naive reference, and malformed input."""

import gzip
import os

import numpy as np
import pytest

import data_utils
from conftest import CRITEO_SAMPLE
from helpers import MISSING, naive_row, row_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


def parse_all(raw: bytes, path="f.txt"):
    rows = data_utils.parse_block(raw, path, 1)
    return rows.label, rows.dense, rows.categorical.T


@pytest.mark.skipif(not os.path.exists(CRITEO_SAMPLE), reason="no ../shared/data/criteo_sample.tsv")
def test_real_rows_parse_like_the_naive_reference():
    raw = open(CRITEO_SAMPLE, "rb").read()
    lines = raw.splitlines(keepends=True)
    label, dense, cats = [], [], []
    first = 1
    for block in data_utils.read_line_blocks(CRITEO_SAMPLE, block_bytes=100_000):  # many blocks
        rows = data_utils.parse_block(block, CRITEO_SAMPLE, first)
        first += len(rows.label)
        label.append(rows.label), dense.append(rows.dense), cats.append(rows.categorical.T)
    expected = [naive_row(line) for line in lines]
    assert first - 1 == len(lines) == 7026
    np.testing.assert_array_equal(np.concatenate(label), [e[0] for e in expected])
    np.testing.assert_array_equal(np.concatenate(dense), [e[1] for e in expected])
    np.testing.assert_array_equal(np.concatenate(cats), [e[2] for e in expected])
    assert (np.concatenate(cats) == MISSING).any() and (np.concatenate(dense) == 0).any()


def test_edge_cases_of_integers_and_categoricals():
    cases = [
        row_text(1, [None, -1, -2147483648, 0, 7, 12345678, 123456789, 99999999999999, "+5", "-0", 2147483647,
                     2147483648, 3],
                 [None, "ABCDEF12", "abcdef12", "0", "f", "12345", "00000000", "ffffffff"] + [None] * 18),
        row_text(0, [None] * 13, [None] * 26).replace(b"\n", b"\r\n"),  # all missing, Windows line end
    ]
    label, dense, cats = parse_all(b"".join(cases))
    expected = [naive_row(line) for line in cases]
    np.testing.assert_array_equal(label, [1, 0])
    np.testing.assert_array_equal(dense, [e[1] for e in expected])
    np.testing.assert_array_equal(cats, [e[2] for e in expected])
    assert dense[0, :3].tolist() == [0, 0, 0]  # missing, negative, very negative
    assert dense[0, 7:].tolist() == [2147483647, 5, 0, 2147483647, 2147483647, 3]  # saturates at int32 max
    assert cats[0, :8].tolist() == [MISSING, 0xABCDEF12, 0xABCDEF12, 0, 15, 0x12345, 0, 0xFFFFFFFF]
    assert (cats[1] == MISSING).all()


def test_integers_longer_than_sixteen_characters_keep_their_value():
    """Leading zeros make a small value long; only values above int32 max saturate."""
    values = ["0" * 16 + "7", "+" + "0" * 18 + "42", "-" + "0" * 20 + "9", "0" * 15 + "2147483648", "0" * 30,
              "1" * 20, "0" * 17 + "123456789", None, 1, 2, 3, 4, 5]
    line = row_text(0, values, [None] * 26)
    _, dense, _ = parse_all(line)
    assert dense[0].tolist() == [7, 42, 0, 2147483647, 0, 2147483647, 123456789, 0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(dense, [naive_row(line)[1]])


def test_random_fields_agree_with_the_naive_reference():
    rng = np.random.default_rng(5)
    lines = []
    for _ in range(300):
        ints = [None if rng.random() < 0.2 else int(rng.integers(-50, 10**int(rng.integers(1, 12)))) for _ in range(13)]
        cats = [None if rng.random() < 0.2 else "%x" % int(rng.integers(0, 2**32)) for _ in range(26)]
        lines.append(row_text(int(rng.integers(0, 2)), ints, cats))
    label, dense, cats = parse_all(b"".join(lines))
    expected = [naive_row(line) for line in lines]
    np.testing.assert_array_equal(dense, [e[1] for e in expected])
    np.testing.assert_array_equal(cats, [e[2] for e in expected])


def test_last_line_without_newline_is_read(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(row_text(1) + row_text(0).rstrip(b"\n"))
    blocks = list(data_utils.read_line_blocks(str(path)))
    assert parse_all(b"".join(blocks))[0].tolist() == [1, 0]


GOOD = row_text(0)


@pytest.mark.parametrize("bad_line,message", [
    (GOOD.replace(b"\t", b"", 1), "f.txt:3: expected 40 tab-separated fields (label, 13 integers, 26 categoricals), "
                                  "found 39"),
    (GOOD[:-1] + b"\t\n", "f.txt:3: expected 40 tab-separated fields (label, 13 integers, 26 categoricals), found 41"),
    (b"2" + GOOD[1:], "f.txt:3: field 1 (label) must be 0 or 1, found '2'"),
    (b"\t".join([b"0", b"12a"] + GOOD.split(b"\t")[2:]), "f.txt:3: field 2 (I1) is not an integer, found '12a'"),
    (b"\t".join([b"0", b"-"] + GOOD.split(b"\t")[2:]), "f.txt:3: field 2 (I1) is not an integer, found '-'"),
    (b"\t".join(GOOD.split(b"\t")[:20] + [b"0a1b2c3g"] + GOOD.split(b"\t")[21:]),
     "f.txt:3: field 21 (C7) is not a hex value of at most 8 digits, found '0a1b2c3g'"),
    (b"\t".join(GOOD.split(b"\t")[:20] + [b"0a1b2c3d4"] + GOOD.split(b"\t")[21:]),
     "f.txt:3: field 21 (C7) is not a hex value of at most 8 digits, found '0a1b2c3d4'"),
    (b"\n", "f.txt:3: empty line"),
    (GOOD.replace(b"\t", b"\x00", 1), "f.txt:3: unexpected control character 0x00"),
])
def test_malformed_line_is_named_by_file_and_line(bad_line, message):
    with pytest.raises(data_utils.DataError) as error:
        data_utils.parse_block(GOOD * 2 + bad_line + GOOD, "f.txt", 1)
    assert str(error.value).startswith(message)


def write_kaggle(tmp_path, content: bytes):
    path = tmp_path / "train.txt"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("content,message", [
    (GOOD * 10 + GOOD.replace(b"\t", b"", 1) + GOOD * 3, "train.txt:11: expected 40 tab-separated fields"),
    (GOOD * 10 + GOOD[:100], "train.txt:11: expected 40 tab-separated fields"),  # truncated file
    (GOOD * 20 + b"1\t" + b"x\t" * 38 + b"y\n", "train.txt:21: field 2 (I1) is not an integer, found 'x'"),
    (b"", "train.txt: empty file (no rows)"),
    (GOOD * 5, "train.txt: 5 rows are too few to cut into 7 days"),
    (GOOD, "train.txt: 1 row is too few to cut into 7 days"),
])
def test_malformed_kaggle_file_is_a_one_line_error_and_leaves_nothing_complete(tmp_path, capsys, content, message):
    path = write_kaggle(tmp_path, content)
    out_dir = tmp_path / "processed"
    code = data_utils.main(["preprocess", f"--raw-data-file={path}", f"--processed-data-file={out_dir}.npz"])
    err = capsys.readouterr().err
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("data_utils.py: error: ") and message in last
    assert "Traceback" not in err
    assert not (out_dir / "metadata.json").exists()
    leftovers = [p.name for p in out_dir.rglob("*") if p.is_file()] if out_dir.exists() else []
    assert not any(name.endswith(".npy") and not name.startswith("day_") for name in leftovers)


def test_malformed_input_through_the_trainer_is_one_line_without_traceback(tmp_path, run_main):
    path = write_kaggle(tmp_path, GOOD * 10 + b"0\t1\t2\n" + GOOD * 3)
    code, out, err = run_main("--data-generation=dataset", f"--raw-data-file={path}", "--arch-mlp-bot=13-4-2")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"dlrm_s_pytorch.py: error: {path}:11: expected 40 tab-separated fields "
        "(label, 13 integers, 26 categoricals), found 3")
    assert "Traceback" not in err and "Finished" not in out


def test_missing_terabyte_day_and_truncated_gzip_are_named(tmp_path):
    for day in range(24):
        if day != 7:
            (tmp_path / f"day_{day}").write_bytes(GOOD * 3)
    def preprocess():
        data_utils.preprocess(str(tmp_path / "day"), str(tmp_path / "out"), "terabyte", log=lambda m: None,
                              progress=False)

    with pytest.raises(data_utils.DataError, match=r"day file .*day_7 \(or \.gz\) not found"):
        preprocess()
    (tmp_path / "day_7.gz").write_bytes(gzip.compress(GOOD * 50)[:-30])
    with pytest.raises(data_utils.DataError, match=r"day_7.gz: truncated or corrupt gzip file"):
        preprocess()
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_binary_garbage_is_rejected(tmp_path):
    path = write_kaggle(tmp_path, bytes(range(256)) * 4000)
    with pytest.raises(data_utils.DataError, match="train.txt:1: unexpected control character 0x00"):
        data_utils.preprocess(str(path), str(tmp_path / "out"), log=lambda m: None, progress=False)


@pytest.mark.parametrize("lines", [
    [b"0,1,2\n", b"1,2,3\n", b"0,3,4\n"],  # commas for tabs
    [b"0\t1\n", b"1\t2\n", b"0\t3\n"],  # two fields per line
    [row_text(), b"0\t1\n"] + [row_text()] * 10,  # a bad second line in a file of enough rows
])
def test_malformed_lines_are_named_before_the_row_count_is_judged(tmp_path, run_main, lines):
    raw = tmp_path / "train.txt"
    raw.write_bytes(b"".join(lines))
    bad = next(n for n, line in enumerate(lines, 1) if line.count(b"\t") != 39)
    code, out, err = run_main("--data-generation=dataset", f"--raw-data-file={raw}", "--arch-mlp-bot=13-4-2")
    assert code == 1 and err.count("\n") == 1
    assert f"{raw}:{bad}: expected 40 tab-separated fields" in err and "too few" not in err
