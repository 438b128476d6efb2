"""Synthetic trace data: stack distances, the distribution file, reuse reproduced, the recorder tool."""

import os

import numpy as np
import pytest

from dlrmkit import trace_data
from conftest import CRITEO_SAMPLE, ROOT

SAMPLE_TRACE = os.path.join(ROOT, "bench", "traces", "dist_emb_j.log")


def naive_stack_distances(trace):
    stack, out = [], []
    for x in trace:
        if x in stack:
            out.append(len(stack) - stack.index(x))
            stack.remove(x)
        else:
            out.append(0)
        stack.append(x)
    return out


def recorded_trace(length=20000, ids=300, seed=0):
    """Zipf-popular ids: a skewed reuse distribution with a long tail."""
    return np.random.default_rng(seed).zipf(1.3, length) % ids


def binned(dist, edges=(0, 1, 2, 3, 5, 9, 17, 33, 65, 129, 257, 1 << 30)):
    probabilities = np.zeros(len(edges) - 1)
    np.add.at(probabilities, np.searchsorted(edges, dist.distances, side="right") - 1, dist.probabilities)
    return probabilities


def test_stack_distances_match_the_naive_lru_stack():
    trace = recorded_trace(3000, 60)
    assert trace_data.stack_distances(trace).tolist() == naive_stack_distances(trace.tolist())
    assert trace_data.stack_distances([5, 5, 7, 5, 9, 7]).tolist() == [0, 1, 0, 2, 0, 3]


def test_generated_stream_reproduces_the_recorded_reuse_distribution():
    recorded = trace_data.distribution_from_trace(recorded_trace())
    generated = trace_data.generate_accesses(recorded, 20000, np.random.default_rng(1))
    reproduced = trace_data.distribution_from_trace(generated)
    total_variation = 0.5 * np.abs(binned(recorded) - binned(reproduced)).sum()
    assert total_variation < 0.03
    assert set(generated.tolist()) <= set(recorded.ids.tolist())


def test_padding_never_draws_first_accesses():
    recorded = trace_data.distribution_from_trace(recorded_trace(5000, 100))
    generated = trace_data.generate_accesses(recorded, 5000, np.random.default_rng(1), enable_padding=True)
    # without d = 0 draws the stream cycles through the most recent ids only
    lru_front = recorded.ids[: recorded.ids.size - recorded.distances[-1]].tolist()
    assert not set(generated.tolist()) & set(lru_front)


def test_distribution_file_round_trip_and_table_numbering(tmp_path):
    dist = trace_data.distribution_from_trace(recorded_trace(2000, 50))
    pattern = str(tmp_path / "j_dir" / "dist_emb_j.log")
    path = trace_data.trace_file_for_table(pattern, 12)
    assert path == str(tmp_path / "j_dir" / "dist_emb_12.log")  # only the file name's last j
    trace_data.write_trace_distribution(path, dist)
    back = trace_data.read_trace_distribution(path)
    assert back.ids.tolist() == dist.ids.tolist() and back.distances.tolist() == dist.distances.tolist()
    np.testing.assert_allclose(back.cumulative, dist.cumulative)
    assert open(path).readline().startswith(", ".join(map(str, dist.ids[:3].tolist())))


@pytest.mark.parametrize("content,message", [
    ("1, 2\n0, 1\n", "expected 3 lines"),
    ("1, x\n0, 1\n0.5, 1.0\n", ":1: expected comma-separated ints"),
    ("1, 2\n1, 2\n0.5, 1.0\n", ":2: the stack distances must be ascending and start with 0"),
    ("1, 2\n0, 1\n0.5\n", ":3: 1 probabilities for 2 stack distances"),
    ("1, 2\n0, 1\n0.5, 0.7\n", ":3: cumulative probabilities must be non-decreasing and end at 1"),
    ("99999999999999999999999, 2\n0, 1\n0.5, 1.0\n", ":1: expected comma-separated ints"),  # beyond int64
    ("1, 2\n0, 1\nnan, 1.0\n", ":3: the cumulative probabilities must be numbers"),
    (b"\xff\xfe1, 2\n", "not a text file of a trace distribution"),
])
def test_malformed_distribution_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "dist_emb_0.log"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(trace_data.TraceFileError, match=message) as error:
        trace_data.read_trace_distribution(str(path))
    assert str(path) in str(error.value)


def test_synthetic_dataset_batches_are_pure_and_follow_the_sample_traces():
    from dlrm_data import RandomDataConfig

    config = RandomDataConfig(num_indices_per_lookup=1, num_indices_per_lookup_fixed=True)
    ds = trace_data.SyntheticTraceDataset(4, [1000, 1000, 1000], 6000, 200, 7, config, SAMPLE_TRACE)
    assert len(ds) == 30
    first, again = ds[3], ds[3]
    fields = ("dense_x", "offsets", "indices", "target")
    assert all(np.array_equal(getattr(first, f), getattr(again, f)) for f in fields)
    for t in range(3):
        # one id per bag: table t's ids, batch after batch, are its stream in order
        stream = np.concatenate([ds[j].lS_i[t].numpy() for j in range(len(ds))])
        np.testing.assert_array_equal(stream, ds.streams[t][:6000])
        # reuse within 64 distinct ids (well sampled by 6000 accesses) as recorded
        recorded = binned(trace_data.read_trace_distribution(trace_data.trace_file_for_table(SAMPLE_TRACE, t)))[1:8]
        generated = binned(trace_data.distribution_from_trace(stream))[1:8]
        assert 0.5 * np.abs(recorded / recorded.sum() - generated / generated.sum()).sum() < 0.05


def test_synthetic_data_from_the_command_line(run_main):
    flags = ["--data-generation=synthetic", f"--data-trace-file={SAMPLE_TRACE}", "--arch-embedding-size=1000-500-100",
             "--mini-batch-size=8", "--data-size=32", "--num-indices-per-lookup=3"]
    code, out, err = run_main(*flags, "--test-freq=4", "--loss-function=bce", "--round-targets")
    assert code == 0 and out.count("Finished training it") == 4 and ", auc=" in out
    # the sample's ids reach 999: tables with fewer rows take them modulo their rows, with a note
    assert "table 2 has 100 rows; ids are taken modulo 100" in err
    code, _, err = run_main(*flags[:1], "--data-trace-file=/no/such/dist_emb_j.log")
    assert code == 1 and "--data-trace-file: /no/such/dist_emb_0.log: cannot read" in err and err.count("\n") == 1


def test_record_trace_tool_writes_files_the_trainer_reads(tmp_path, capsys):
    from tools.record_trace import main as record_trace

    ids = np.stack([recorded_trace(4000, 200, seed=1), recorded_trace(4000, 50, seed=2)], axis=1)
    np.savez(tmp_path / "processed.npz", X_cat=ids, X_int=np.zeros((4000, 13)), y=np.zeros(4000))
    pattern = str(tmp_path / "dist_emb_j.log")
    assert record_trace([f"--input={tmp_path / 'processed.npz'}", f"--output={pattern}"]) == 0
    assert "table 1: 4000 accesses, 50 distinct ids" in capsys.readouterr().out
    recorded = trace_data.read_trace_distribution(trace_data.trace_file_for_table(pattern, 0))
    expected = trace_data.distribution_from_trace(ids[:, 0])
    assert recorded.distances.tolist() == expected.distances.tolist()
    assert record_trace([f"--input={tmp_path / 'missing.npz'}"]) == 1
    assert capsys.readouterr().err.strip().endswith("missing.npz: no such file")


@pytest.mark.skipif(not os.path.exists(CRITEO_SAMPLE), reason="Criteo sample not present")
def test_record_trace_tool_reads_raw_criteo_text(tmp_path):
    from tools.record_trace import read_columns

    columns = read_columns(CRITEO_SAMPLE, 5000)
    assert len(columns) == 26 and all(c.size == 5000 for c in columns)
    with open(CRITEO_SAMPLE) as f:
        values = [line.rstrip("\n").split("\t")[14] for _, line in zip(range(5000), f)]
    first_seen = {v: i for i, v in reversed(list(enumerate(dict.fromkeys(values))))}
    assert columns[0].tolist() == [first_seen[v] for v in values]


def test_record_trace_reads_raw_values_as_the_preprocessing_does(tmp_path):
    from helpers import row_text
    from tools.record_trace import read_columns

    cats = ["0000000a", "0000000A", "a", None, "00000000", None, "0000000b"]
    path = tmp_path / "raw.txt"
    path.write_bytes(b"".join(row_text(0, cats=[c] * 26) for c in cats))
    assert read_columns(str(path), 100)[0].tolist() == [0, 0, 0, 1, 2, 1, 3]


def test_record_trace_reads_the_trainers_processed_data_as_the_trainer_names_it(tmp_path, capsys):
    from helpers import fake_kaggle, preprocess_quietly
    from tools.record_trace import main as record_trace
    from tools.record_trace import read_columns

    raw = fake_kaggle(tmp_path, 700)
    processed, _ = preprocess_quietly(raw, tmp_path / "small_processed")
    from_text = read_columns(raw, 600)
    for spelling in (tmp_path / "small_processed.npz", tmp_path / "small_processed", processed.out_dir):
        columns = read_columns(str(spelling), 600)  # the days in order: the raw file's first 600 rows
        assert len(columns) == 26 and all(c.size == 600 for c in columns)
        for ours, text in zip(columns, from_text):  # other ids, the same reuse pattern
            assert trace_data.distribution_from_trace(ours).distances.tolist() == \
                trace_data.distribution_from_trace(text).distances.tolist()
    (tmp_path / "small_processed" / "kaggle-hash10").mkdir()
    (tmp_path / "small_processed" / "kaggle-hash10" / "metadata.json").write_text('{"settings": {}}')
    assert record_trace([f"--input={tmp_path / 'small_processed.npz'}"]) == 1
    assert "2 processed sets in" in capsys.readouterr().err
    assert record_trace([f"--input={tmp_path}"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"{tmp_path}: no processed data in {tmp_path}")
