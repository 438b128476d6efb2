"""Multi-hot inputs: the expansion (bag sizes, determinism, distributions), on-the-fly and materialized
Criteo data, random data, the flags, the memory estimate, resumes, ONNX export and quantized inference."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import data_utils
import dlrm_data
import dlrm_s_pytorch as dlrm
from conftest import ROOT
from dlrmkit import multihot, onnx_export, quantization
from dlrmkit.multihot import MultiHot
from helpers import fake_kaggle

TABLES = [1000, 7, 300, 1]
SIZES = [3, 1, 5, 2]
MLPERF = ",".join(map(str, multihot.MLPERF_SIZES))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ============================================================================ the expansion
@pytest.mark.parametrize("distribution", multihot.DISTRIBUTIONS)
def test_bags_have_the_configured_sizes_and_start_with_their_id(distribution):
    ids = np.stack([np.random.default_rng(t).integers(0, n, 40) for t, n in enumerate(TABLES)], axis=1)
    ids[5] = ids[9]  # a repeated sample
    mh = MultiHot(SIZES, TABLES, distribution)
    sparse = mh.expand(ids)
    assert sparse.num_tables == 4 and sparse.batch_size == 40
    assert sparse.lengths().tolist() == np.repeat(SIZES, 40).tolist()
    for t, (indices, offsets, _) in enumerate(sparse.tables()):
        bags = indices.view(40, SIZES[t])
        assert bags[:, 0].tolist() == ids[:, t].tolist()
        assert int(bags.min()) >= 0 and int(bags.max()) < TABLES[t]
        assert bags[5].tolist() == bags[9].tolist()
        assert offsets.tolist() == list(range(0, 40 * SIZES[t], SIZES[t]))
    # a bag depends on (table, id) only: not on the batch nor on the other tables
    part = MultiHot(SIZES, [5, 7, 300, 99], distribution).expand(ids[10:13] % [5, 7, 300, 1])
    assert [p.tolist() for p, _, _ in part.tables()][2] == list(sparse.tables())[2][0][10 * 5 : 13 * 5].tolist()
    # the materialized layout holds the same bags
    rows = mh.rows(ids)
    assert rows.shape == (40, sum(SIZES)) and (rows[:, [0, 3, 4, 9]] == ids).all()
    again = mh.from_rows(rows)
    assert torch.equal(again.indices, sparse.indices) and torch.equal(again.offsets, sparse.offsets)


def bag_digest():
    ids = np.arange(0, 3_000_000, 997).reshape(-1, 1)
    digest = hashlib.sha1()
    for distribution in multihot.DISTRIBUTIONS:
        digest.update(MultiHot([9], [2_000_003], distribution).rows(ids % 2_000_003).tobytes())
    return digest.hexdigest()


def test_expansion_is_the_same_in_another_process_and_ignores_the_global_seed():
    code = ("import sys; sys.path.insert(0, 'tests'); import numpy as np, torch; np.random.seed(7); "
            "torch.manual_seed(7); from test_multihot import bag_digest; print(bag_digest())")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    np.random.seed(1)
    assert other.stdout.strip() == bag_digest()


def synthetic_ids(distribution, rows, draws):
    """`draws` synthetic ids of one table (the bags' ids after the first)."""
    ids = np.arange(min(rows, 20_000)).reshape(-1, 1)
    size = 1 + -(-draws // len(ids))
    return MultiHot([size], [rows], distribution).rows(ids)[:, 1:].reshape(-1)[:draws]


@pytest.mark.parametrize("rows", [10, 1000, 40_000_000])
def test_uniform_ids_are_distributed_as_numpys_randint(rows):
    draws = 200_000
    ours = synthetic_ids("uniform", rows, draws)
    reference = np.random.default_rng(0).integers(0, rows, draws)
    for sample in (ours, reference):  # same mean and flat deciles (chi-square, 9 degrees of freedom)
        assert abs(sample.mean() / (rows - 1) - 0.5) < 0.01
        counts = np.bincount(sample * 10 // rows, minlength=10)
        assert ((counts - draws / 10) ** 2 / (draws / 10)).sum() < 40  # p ~ 1e-5 for a flat histogram
    assert ours.min() >= 0 and ours.max() < rows


@pytest.mark.parametrize("rows", [1000, 40_000_000])
def test_pareto_ids_are_distributed_as_numpys_pareto_modulo_the_rows(rows):
    draws = 200_000
    ours = synthetic_ids("pareto", rows, draws)
    reference = np.fmod(np.floor(np.random.default_rng(0).pareto(multihot.PARETO_SHAPE, draws)), rows).astype(np.int64)
    assert ours.min() >= 0 and ours.max() < rows
    for k in range(5):  # the heavy head: P(id = 0) = 1 - 2^(-1/4) = 0.159, then decreasing
        assert abs(np.mean(ours == k) - np.mean(reference == k)) < 0.006
    assert abs(np.mean(ours == 0) - (1 - 2 ** -0.25)) < 0.005
    for bound in (15, 100, 999):  # P(id < 15) = 1/2 before any modulo
        assert abs(np.mean(ours < bound) - np.mean(reference < bound)) < 0.008
    assert abs(np.mean(ours < 15) - 0.5) < 0.006


@pytest.mark.parametrize("sizes,tables,message", [
    ([3, 2], 3, "--multi-hot-sizes has 2 values but the data has 3 tables"),
    ([0], 2, "--multi-hot-sizes: every size must be at least 1, got 0"),
])
def test_bad_sizes_are_value_errors(sizes, tables, message):
    with pytest.raises(ValueError, match=message):
        MultiHot(sizes, [10] * tables)


def test_expanding_bags_of_several_ids_is_refused():
    sparse = dlrm_data.RandomDataset(2, [50, 40], 8, 8, config=dlrm_data.RandomDataConfig(num_indices_per_lookup=4,
                                                                                          num_indices_per_lookup_fixed=True))[0].sparse
    with pytest.raises(ValueError, match="needs one-hot input"):
        MultiHot([2], [50, 40]).expand_sparse(sparse)


# ============================================================================ Criteo data
@pytest.fixture(scope="module")
def kaggle_file(tmp_path_factory):
    return fake_kaggle(tmp_path_factory.mktemp("kaggle"), 3000, seed=6)


def dataset_args(*extra):
    return dlrm.parse_args(["--data-generation=dataset", "--mini-batch-size=64", "--test-mini-batch-size=100",
                            "--numpy-rand-seed=5", "--data-randomize=total", *extra])


def datasets(args):
    return dlrm_data.make_criteo_datasets(args, log=lambda *a: None, progress=False)


def all_batches(dataset, epoch=1):
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return [dataset[j] for j in range(len(dataset))]


def assert_same_batches(first, second):
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        for name in ("dense_x", "offsets", "indices", "target"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def materialize(*argv):
    messages = []
    args = data_utils.build_parser().parse_args(["multi-hot", *argv])
    data_utils.materialize_multi_hot(args, log=messages.append)
    return messages


@pytest.fixture(scope="module")
def materialized(kaggle_file, tmp_path_factory):
    """(processed one-hot directory, materialized pareto multi-hot directory with the MLPerf sizes)."""
    base = tmp_path_factory.mktemp("multihot")
    processed, out = str(base / "processed"), str(base / "mh")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_utils, "MULTI_HOT_CHUNK_ROWS", 150)  # several chunks per day
        materialize(f"--raw-data-file={kaggle_file}", f"--processed-data-file={processed}",
                    f"--multi-hot-sizes={MLPERF}", "--multi-hot-distribution-type=pareto", f"--out={out}")
    return processed, out


def test_materialized_set_gives_the_batches_of_on_the_fly_expansion(materialized):
    processed, out = materialized
    metadata = json.load(open(os.path.join(out, "metadata.json")))
    assert metadata["multi_hot"]["sizes"] == multihot.MLPERF_SIZES and metadata["multi_hot"]["distribution"] == "pareto"
    on_the_fly = datasets(dataset_args(f"--processed-data-file={processed}", f"--multi-hot-sizes={MLPERF}",
                                       "--multi-hot-distribution-type=pareto"))
    for storage in ([], ["--memory-map"]):
        read = datasets(dataset_args(f"--processed-data-file={out}", *storage))
        assert read[2] == on_the_fly[2]  # table sizes
        for split in (0, 1):  # train (shuffled, epoch 1) and test
            assert_same_batches(all_batches(read[split]), all_batches(on_the_fly[split]))
    assert read[0].fingerprint() == on_the_fly[0].fingerprint()  # a resume may switch between them
    batch = all_batches(read[0])[0]
    assert batch.sparse.lengths().view(26, -1)[:, 0].tolist() == multihot.MLPERF_SIZES


def test_materializing_resumes_after_an_interruption_and_reuses_a_finished_set(materialized, tmp_path, monkeypatch,
                                                                              run_main):
    processed, reference = materialized
    argv = [f"--processed-data-file={processed}", f"--multi-hot-sizes={MLPERF}", "--multi-hot-distribution-type=pareto",
            f"--out={tmp_path / 'mh'}"]
    real_close, closed = data_utils.NpyWriter.close, []

    def interrupted_close(writer):
        if writer.path.endswith("day_3_multihot.npy"):
            raise KeyboardInterrupt
        closed.append(os.path.basename(writer.path))
        real_close(writer)

    monkeypatch.setattr(data_utils.NpyWriter, "close", interrupted_close)
    with pytest.raises(KeyboardInterrupt):
        materialize(*argv)
    names = set(os.listdir(tmp_path / "mh"))
    assert "metadata.json" not in names and "work.json" in names and "day_3_label.npy" in names
    assert not any(name.endswith(".tmp") for name in names) and "day_3_multihot.npy" not in names
    monkeypatch.setattr(data_utils.NpyWriter, "close", real_close)
    # the trainer does not mistake the unfinished set for anything else
    code, out, err = run_main(*TRAIN, f"--processed-data-file={tmp_path / 'mh'}", f"--raw-data-file={tmp_path / 'r'}")
    assert code == 1 and err.count("\n") == 1 and "an unfinished multi-hot set" in err, err
    assert sorted(os.listdir(tmp_path / "mh")) == sorted(names)
    assert "Resuming: 3 of 7 days already written" in materialize(*argv)
    for name in os.listdir(reference):
        assert (tmp_path / "mh" / name).read_bytes() == open(os.path.join(reference, name), "rb").read(), name
    assert materialize(*argv)[-1].endswith("is already written with these settings")
    # other settings into the same directory: a finished set is never replaced silently
    with pytest.raises(data_utils.DataError, match="holds a finished multi-hot set of other settings"):
        materialize(*argv[:1], "--multi-hot-sizes=2", f"--out={tmp_path / 'mh'}")
    assert json.load(open(tmp_path / "mh" / "metadata.json"))["multi_hot"]["distribution"] == "pareto"


TRAIN = ["--data-generation=dataset", "--arch-sparse-feature-size=4", "--arch-mlp-bot=13-4", "--arch-mlp-top=4-1",
         "--mini-batch-size=256", "--num-batches=3", "--test-freq=3", "--loss-function=bce"]


def test_the_trainer_reads_a_materialized_set_and_refuses_flags_that_disagree(materialized, run_main, tmp_path):
    processed, out = materialized
    log = tmp_path / "metrics.jsonl"
    code, stdout, err = run_main(*TRAIN, f"--processed-data-file={out}", f"--multi-hot-sizes={MLPERF}",
                                 "--multi-hot-distribution-type=pareto", f"--metrics-log-file={log}")
    assert code == 0, err
    assert f"Reading multi-hot data={out} (pareto, 214 ids per sample)" in stdout
    config = json.loads(log.read_text().splitlines()[0])["config"]["args"]
    assert config["multi_hot_sizes"] == multihot.MLPERF_SIZES and config["multi_hot_distribution_type"] == "pareto"
    code, same, _ = run_main(*TRAIN, f"--processed-data-file={processed}", f"--multi-hot-sizes={MLPERF}",
                             "--multi-hot-distribution-type=pareto")
    assert code == 0
    losses = [line for line in stdout.splitlines() if line.startswith(("Finished", " accuracy"))]
    assert losses and losses == [line for line in same.splitlines() if line.startswith(("Finished", " accuracy"))]
    for extra, message in ((["--multi-hot-sizes=2"], "holds multi-hot data of sizes 3-2-1-2-6"),
                           ([f"--multi-hot-sizes={MLPERF}"], "(pareto), but --multi-hot-sizes=3-2-1"),
                           (["--multi-hot-distribution-type=uniform", f"--multi-hot-sizes={MLPERF}"], "were given"),
                           (["--max-ind-range=100"], "multi-hot data of --max-ind-range=-1, but --max-ind-range=100"),
                           (["--mlperf-bin-loader"], "--mlperf-bin-loader: not available for multi-hot data")):
        code, stdout, err = run_main(*TRAIN, f"--processed-data-file={out}", *extra)
        assert code == 1 and message in err and err.count("\n") == 1 and stdout == "", (extra, err)


def test_a_materialized_set_is_checked_against_a_given_raw_file(materialized, kaggle_file, run_main, tmp_path):
    _, out = materialized
    raw = tmp_path / "train.txt"
    shutil.copy2(kaggle_file, raw)  # the same file: name, size and modification time
    code, stdout, err = run_main(*TRAIN, f"--processed-data-file={out}", f"--raw-data-file={raw}")
    assert code == 0, err
    with open(raw, "ab") as f:
        f.write(open(kaggle_file, "rb").readline())
    code, stdout, err = run_main(*TRAIN, f"--processed-data-file={out}", f"--raw-data-file={raw}")
    assert code == 1 and err.count("\n") == 1 and "Finished" not in stdout
    assert (f"--processed-data-file {out}: built from other raw data than --raw-data-file {raw} (raw file train.txt "
            "changed (size or modification time)); rerun python data_utils.py multi-hot") in err


@pytest.mark.parametrize("argv,message", [
    (["--multi-hot-sizes=3-2"], "--multi-hot-sizes has 2 values but the data has 3 tables"),
    (["--multi-hot-sizes=3,0,1"], "--multi-hot-sizes: every value must be at least 1, got 3-0-1"),
    (["--data-generation=dataset", "--raw-data-file=x", "--multi-hot-sizes=3-2-1"],
     "--multi-hot-sizes has 3 values but the data has 26 tables"),
])
def test_bad_multi_hot_flags_are_one_line_errors_before_any_work(run_main, argv, message):
    code, out, err = run_main(*argv)
    assert code == 1 and message in err and err.count("\n") == 1 and out == ""


@pytest.mark.parametrize("argv,message", [
    (["--multi-hot-sizes=3-2"], "--multi-hot-sizes has 2 values but the data has 26 tables"),
    (["--multi-hot-sizes=0"], "--multi-hot-sizes: every value must be at least 1, got 0"),
])
def test_bad_materializing_flags_are_one_line_errors(capsys, tmp_path, argv, message):
    code = data_utils.main(["multi-hot", f"--raw-data-file={tmp_path / 'none.txt'}", f"--out={tmp_path / 'o'}", *argv])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o")


def test_materializing_into_the_processed_set_or_a_foreign_directory_is_refused(materialized, tmp_path, capsys):
    processed, out = materialized
    (tmp_path / "notes.txt").write_text("mine")
    for target, message in ((tmp_path, "holds other files (notes.txt)"),
                            (os.path.join(processed, "kaggle-dictionary"), "is the processed one-hot set itself"),
                            (tmp_path / "notes.txt", "is a file"),
                            (tmp_path / "notes.txt" / "sub", "notes.txt is a file, not a folder"),
                            ("", "--out is empty"),
                            *((("/proc/multi-hot", "nothing can be written in /proc"),) if os.path.isdir("/proc") else ())):
        code = data_utils.main(["multi-hot", f"--processed-data-file={processed}", "--multi-hot-sizes=2",
                                f"--out={target}"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and err.count("\n") == 1 and "Reading" not in err
    code = data_utils.main(["multi-hot", f"--processed-data-file={out}", "--multi-hot-sizes=2", f"--out={tmp_path}/b"])
    assert code == 1 and "is multi-hot already" in capsys.readouterr().err


# ============================================================================ random data, resumes, memory
RANDOM = ["--arch-embedding-size=100-50-20", "--arch-sparse-feature-size=4", "--arch-mlp-bot=4-8-4",
          "--arch-mlp-top=8-1", "--data-size=40", "--mini-batch-size=8", "--loss-function=bce", "--round-targets"]


def test_random_data_draws_one_id_per_table_and_expands_it():
    args = dlrm.parse_args([*RANDOM, "--multi-hot-sizes=3-1-4", "--num-indices-per-lookup=5"])
    notes = dlrm.validate_args(args, distributed=False)
    assert "note: --num-indices-per-lookup has no effect with --multi-hot-sizes (one id per table and sample, " \
           "expanded into its multi-hot bag)" in notes
    train, _, _, sizes = dlrm.make_datasets(args)
    one_hot = dlrm_data.RandomDataset(4, sizes, 40, 8, 123, dlrm_data.RandomDataConfig(
        num_indices_per_lookup=1, num_indices_per_lookup_fixed=True))
    expected = MultiHot([3, 1, 4], sizes).expand_sparse(one_hot[2].sparse)
    batch = train[2]
    assert torch.equal(batch.indices, expected.indices) and torch.equal(batch.offsets, expected.offsets)
    assert torch.equal(batch.dense_x, one_hot[2].dense_x)


def test_qr_md_and_weighted_tables_train_on_multi_hot_bags(run_main):
    for extra in (["--qr-flag", "--qr-threshold=30"], ["--md-flag", "--md-threshold=30"], ["--weighted-pooling=learned"]):
        code, out, err = run_main(*RANDOM, "--multi-hot-sizes=3-2-5", "--multi-hot-distribution-type=pareto", *extra)
        assert code == 0 and "loss" in out, err


def test_trace_driven_ids_expand_too():
    args = dlrm.parse_args([*RANDOM, "--data-generation=synthetic",
                            f"--data-trace-file={os.path.join(ROOT, 'bench', 'traces', 'dist_emb_j.log')}",
                            "--multi-hot-sizes=2-1-3"])
    train = dlrm.make_datasets(args)[0]
    batch = train[1]
    one_hot = train.dataset[1]  # the trace's ids, one per table and sample
    assert batch.sparse.lengths().tolist() == [2] * 8 + [1] * 8 + [3] * 8
    assert torch.equal(batch.indices[batch.offsets[:-1]], one_hot.indices)


def test_the_memory_estimate_counts_every_id_of_the_bags():
    one_hot = dlrm.parse_args([*RANDOM, "--num-indices-per-lookup=1", "--num-indices-per-lookup-fixed"])
    multi = dlrm.parse_args([*RANDOM, "--multi-hot-sizes=3-1-5"])
    a, b = dlrm.estimate_memory(one_hot, 4, [100, 50, 20]), dlrm.estimate_memory(multi, 4, [100, 50, 20])
    samples = one_hot.mini_batch_size  # no test batch: --test-freq is off
    assert b.batch_inputs - a.batch_inputs == pytest.approx(samples * 48 * (9 - 3), abs=1)


def test_a_resume_with_other_multi_hot_settings_inside_an_epoch_is_refused(run_main, tmp_path):
    path = tmp_path / "m.pt"
    assert run_main(*RANDOM, "--multi-hot-sizes=3", f"--save-model={path}")[0] == 0
    saved = torch.load(path, weights_only=False)["train_state"]
    assert saved["data_order"]["--multi-hot-sizes"] == "3-3-3"
    state = dlrm.TrainState(next_batch=2, data_order=saved["data_order"])
    for argv, message in ((["--multi-hot-sizes=2"], "--multi-hot-sizes was 3-3-3, now 2-2-2"),
                          (["--multi-hot-sizes=3", "--multi-hot-distribution-type=pareto"],
                           "--multi-hot-distribution-type was uniform, now pareto"),
                          ([], "--multi-hot-sizes was 3-3-3, now not in effect")):
        args = dlrm.parse_args([*RANDOM, *argv])
        train = dlrm.make_datasets(args)[0]
        with pytest.raises(dlrm.DLRMError, match=message + ": the rest of epoch 0 would train other bags of ids"):
            dlrm.check_data_order(state, dlrm.data_order(args, train), str(path))
    args = dlrm.parse_args([*RANDOM, "--multi-hot-sizes=3-3-3"])  # the same settings written otherwise
    dlrm.check_data_order(state, dlrm.data_order(args, dlrm.make_datasets(args)[0]), str(path))


# ============================================================================ ONNX and quantized inference
def multi_hot_batches():
    for n, sizes, distribution in ((16, [3, 1, 5], "uniform"), (5, [1, 7, 2], "pareto"), (1, [1, 1, 1], "uniform")):
        one_hot = dlrm_data.RandomDataset(3, [50, 7, 300], n, n, seed=n, config=dlrm_data.RandomDataConfig(
            num_indices_per_lookup=1, num_indices_per_lookup_fixed=True))
        yield dlrm_data.MultiHotDataset(one_hot, MultiHot(sizes, [50, 7, 300], distribution))[0]


def small_model(**kwargs):
    torch.manual_seed(0)
    args = dlrm.parse_args(["--arch-sparse-feature-size=4", "--arch-mlp-bot=3-6-4", "--arch-mlp-top=5-1", *kwargs.get("argv", [])])
    return dlrm.build_model(args, 3, [50, 7, 300]).eval()


@pytest.mark.parametrize("interaction", [[], ["--arch-interaction-op=dcn", "--dcn-low-rank-dim=3"]], ids=["dot", "dcn"])
def test_onnx_export_of_multi_hot_bags_matches_pytorch(tmp_path, interaction):
    pytest.importorskip("onnx")
    model = small_model(argv=interaction)
    batches = list(multi_hot_batches())
    path = str(tmp_path / "m.onnx")
    assert onnx_export.export_onnx(model, batches[0], path) < 1e-5
    for batch in batches[1:]:
        inputs = (batch.dense_x, batch.offsets, batch.indices)
        with torch.no_grad():
            expected = model(*inputs).numpy()
        np.testing.assert_allclose(onnx_export.run_onnx(path, inputs), expected, rtol=0, atol=1e-5)


def test_quantized_inference_pools_multi_hot_bags():
    model = small_model()
    batches = list(multi_hot_batches())
    with torch.no_grad():
        reference = [model(b.dense_x, b.sparse) for b in batches]
        quantization.quantize_for_inference(model, 32, 8)
        for batch, expected in zip(batches, reference):
            assert float((model(batch.dense_x, batch.sparse) - expected).abs().max()) < 0.01


def test_a_batch_resumed_inside_is_the_same_on_the_fly_and_materialized(materialized):
    """A resume under another batch size starts inside a batch: its remaining rows, expanded alike."""
    processed, out = materialized
    on_the_fly = datasets(dataset_args(f"--processed-data-file={processed}", f"--multi-hot-sizes={MLPERF}",
                                       "--multi-hot-distribution-type=pareto"))[0]
    read = datasets(dataset_args(f"--processed-data-file={out}"))[0]
    rests = []
    for dataset in (on_the_fly, read):
        dataset.set_epoch(1)
        rests.append(dlrm_data.skip_within_batch(dataset, 3, 10)[3])
        assert rests[-1].batch_size == dataset[3].batch_size - 10
        assert rests[-1].sparse.lengths().view(26, -1)[:, 0].tolist() == multihot.MLPERF_SIZES
    assert_same_batches([rests[0]], [rests[1]])


def test_a_materialized_set_too_big_for_memory_asks_for_memory_map(materialized, monkeypatch):
    _, out = materialized
    monkeypatch.setattr(dlrm_data.memory, "usable_memory", lambda: (1 << 20, "a test limit"))
    with pytest.raises(data_utils.DataError, match="takes .* GiB but this process may use .*add --memory-map"):
        datasets(dataset_args(f"--processed-data-file={out}"))
    assert len(datasets(dataset_args(f"--processed-data-file={out}", "--memory-map"))[0]) > 0
