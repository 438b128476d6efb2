"""Resuming a checkpoint: the same sample position under any batch size; changed data-order flags refused."""

import io
import json

import numpy as np
import pytest
import torch

import dlrm_data
import dlrm_s_pytorch as dlrm
from conftest import torch_threads
from helpers import fake_kaggle

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


@pytest.fixture(scope="module")
def kaggle_file(tmp_path_factory):
    return fake_kaggle(tmp_path_factory.mktemp("kaggle"), 7000, seed=4)  # 6 training days of 1000 rows


def flags(raw, *extra):
    return ["--data-generation=dataset", f"--raw-data-file={raw}", "--arch-sparse-feature-size=4",
            "--arch-mlp-bot=13-4", "--arch-mlp-top=4-1", "--loss-function=bce", "--data-randomize=total",
            "--mini-batch-size=128", *extra]


@pytest.fixture(scope="module")
def checkpoint(kaggle_file, tmp_path_factory):
    """Saved at the test after batch 45 of the 47 of epoch 0 (rows 0 .. 5759 of its order trained)."""
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    save = dlrm.save_checkpoint

    def first_only(target, *rest):  # the test after batch 47 may improve on the one after 45: keep the first
        if not path.exists():
            save(target, *rest)

    with pytest.MonkeyPatch.context() as patch, torch_threads(1):
        patch.setattr(dlrm, "save_checkpoint", first_only)
        assert dlrm.main(flags(kaggle_file, "--test-freq=45", f"--save-model={path}")) == 0
    assert torch.load(path, weights_only=False)["iter"] == 45
    return path


def trained_samples(log):
    return [r["samples"] for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "train"]


@pytest.mark.parametrize("batch_size,first_line", [
    (256, "Resuming at sample 5760 of epoch 0 (--mini-batch-size was 128, now 256: batch 22, from its sample 128)"),
    (64, "Resuming at sample 5760 of epoch 0 (--mini-batch-size was 128, now 64: batch 90)"),
])
def test_resume_with_another_batch_size_trains_exactly_the_rest_of_the_epoch(
        kaggle_file, checkpoint, run_main, tmp_path, batch_size, first_line):
    log = tmp_path / "metrics.jsonl"
    code, out, err = run_main(*flags(kaggle_file, f"--mini-batch-size={batch_size}", "--print-freq=1",
                                     f"--load-model={checkpoint}", f"--metrics-log-file={log}"))
    assert code == 0, err
    assert first_line in out.splitlines()
    expected = {256: [128, 112], 64: [64, 64, 64, 48]}[batch_size]  # rows 5760 .. 5999, each once
    assert trained_samples(log) == expected


def test_resumed_batches_hold_exactly_the_rows_not_yet_trained(kaggle_file):
    def dataset(batch_size):
        args = dlrm.parse_args(flags(kaggle_file, f"--mini-batch-size={batch_size}"))
        return dlrm_data.make_criteo_datasets(args, log=lambda *a: None, progress=False)[0]

    def rows(batches):
        dense = torch.cat([b.dense_x for b in batches]).numpy()
        return dense[np.lexsort(dense.T)]

    small, big = dataset(128), dataset(256)
    rest = rows([small[j] for j in range(45, 47)])
    resumed = dlrm_data.skip_within_batch(big, 22, 128)
    np.testing.assert_array_equal(rows([resumed[22], resumed[23]]), rest)
    assert resumed[22].batch_size == 128 and resumed[23].batch_size == 112


def test_batch_tail_keeps_the_last_samples_with_their_bags():
    config = dlrm_data.RandomDataConfig(num_indices_per_lookup=4)
    batch = dlrm_data.RandomDataset(3, [7, 5, 9], 10, 10, seed=3, config=config)[0]
    tail = dlrm_data.batch_tail(batch, 4)
    assert torch.equal(tail.dense_x, batch.dense_x[6:]) and torch.equal(tail.target, batch.target[6:])
    for t in range(3):
        for b in range(4):
            assert torch.equal(tail.lS_i[t][tail.lS_o[t][b]: (tail.lS_o[t][b + 1] if b < 3 else None)],
                               batch.lS_i[t][batch.lS_o[t][6 + b]: (batch.lS_o[t][7 + b] if b < 3 else None)])


@pytest.mark.parametrize("change,message", [
    (["--numpy-rand-seed=7"], "--numpy-rand-seed was 123, now 7"),
    (["--data-randomize=day"], "--data-randomize was total, now day"),
    (["--data-randomize=none"], "--data-randomize was total, now none"),
    (["--data-sub-sample-rate=0.5"], "--data-sub-sample-rate was 0.0, now 0.5"),
    (["--mlperf-bin-loader", "--mlperf-bin-shuffle"], "--mlperf-bin-shuffle was False, now True"),
])
def test_a_changed_data_order_flag_inside_an_epoch_is_refused(kaggle_file, checkpoint, run_main, change, message):
    code, out, err = run_main(*flags(kaggle_file, *change, f"--load-model={checkpoint}"))
    assert code == 1 and "Finished training" not in out
    assert err.strip().splitlines()[-1] == (f"dlrm_s_pytorch.py: error: --load-model {checkpoint}: {message}: the rest of epoch 0 "
                           "would skip or repeat rows; resume with the checkpoint's value")


def test_other_data_files_are_refused(checkpoint, run_main, tmp_path):
    other = fake_kaggle(tmp_path, 7700, seed=4)
    code, _, err = run_main(*flags(other, f"--load-model={checkpoint}"))
    assert code == 1 and "--raw-data-file / --processed-data-file (training rows) was 6000 rows, digest " in err
    assert ", now 6600 rows, digest " in err


def test_the_same_rows_in_another_order_are_other_data(kaggle_file, checkpoint, run_main, tmp_path):
    """A file of the same size (same rows, shuffled) gives other rows at each position: refused too."""
    lines = open(kaggle_file, "rb").read().splitlines(keepends=True)
    np.random.default_rng(0).shuffle(lines)
    shuffled = tmp_path / "shuffled" / "train.txt"
    shuffled.parent.mkdir()
    shuffled.write_bytes(b"".join(lines))
    code, out, err = run_main(*flags(str(shuffled), f"--load-model={checkpoint}"))
    assert code == 1 and "Finished training" not in out
    assert "(training rows) was 6000 rows, digest " in err and ", now 6000 rows, digest " in err


def test_a_batch_size_change_with_shuffled_batches_is_refused(kaggle_file, run_main, tmp_path):
    path = tmp_path / "bin.pt"
    shuffled = ["--mlperf-bin-loader", "--mlperf-bin-shuffle", "--test-freq=20"]
    assert run_main(*flags(kaggle_file, *shuffled, "--num-batches=20", f"--save-model={path}"))[0] == 0
    code, _, err = run_main(*flags(kaggle_file, *shuffled, "--mini-batch-size=64", f"--load-model={path}"))
    assert code == 1 and err.strip().endswith("--mini-batch-size was 128, now 64: with --mlperf-bin-shuffle the rest "
                                              "of epoch 0 depends on it; resume with --mini-batch-size=128")


def test_at_an_epoch_start_a_changed_flag_is_noted(kaggle_file, run_main, tmp_path):
    path = tmp_path / "end.pt"
    assert run_main(*flags(kaggle_file, "--num-batches=3", f"--save-model={path}"))[0] == 0  # saved after epoch 0
    code, out, err = run_main(*flags(kaggle_file, "--num-batches=3", "--nepochs=2", "--numpy-rand-seed=9",
                                     f"--load-model={path}"))
    assert code == 0, err
    assert "note: --numpy-rand-seed was 123 in the checkpoint, now 9 (it is at the start of epoch 1)" in out
    assert out.count("Finished training it") == 3


@pytest.mark.slow
def test_a_distributed_resume_with_another_batch_size_equals_the_single_process_one(
        kaggle_file, checkpoint, run_main, tmp_path):
    from test_distributed import launch, train_losses

    resume = flags(kaggle_file, "--mini-batch-size=256", "--print-freq=1", f"--load-model={checkpoint}")
    code, single, err = run_main(*resume)
    assert code == 0, err
    (_, out, _), _ = launch(2, resume, tmp_path)
    assert "Resuming at sample 5760 of epoch 0" in out
    expected = train_losses(single)
    assert [(e, j) for e, j, _ in expected] == [(0, 23), (0, 24)]
    for (_, _, loss), (_, _, reference) in zip(train_losses(out), expected, strict=True):
        assert loss == pytest.approx(reference, rel=1e-5, abs=1.1e-6)


SMALL = ["--arch-embedding-size=50-40-30", "--arch-sparse-feature-size=4", "--arch-mlp-bot=3-4", "--arch-mlp-top=8-1",
         "--data-size=64", "--mini-batch-size=16", "--loss-function=bce", "--round-targets"]


@pytest.fixture(scope="module")
def adagrad_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("adagrad") / "m.pt"
    with torch_threads(1):
        assert dlrm.main([*SMALL, "--optimizer=adagrad", "--test-freq=2", f"--save-model={path}"]) == 0
    return path


def altered(checkpoint, path, change):
    saved = torch.load(checkpoint, weights_only=False)
    change(saved)
    torch.save(saved, path)
    return path


def poisoned(saved):
    saved["state_dict"] = {k: v.clone() for k, v in saved["state_dict"].items()}
    saved["state_dict"]["top_l.0.weight"][0, 0] = float("nan")


@pytest.mark.parametrize("change,message", [
    (lambda saved: saved.update(state_dict=5), "does not fit this model: Expected state_dict to be dict-like"),
    (poisoned, "the saved top_l.0.weight holds NaN or infinite values"),
    (lambda saved: saved.update(opt_state_dict={"state": 3}), "optimizer state does not fit --optimizer (KeyError"),
    (lambda saved: saved.update(train_state="x"), "not a DLRM checkpoint (train_state is a str)"),
    (lambda saved: saved.update(opt_state_dict={"state": {}, "param_groups": [  # torch.optim.SGD's, the original's
        {"lr": 0.1, "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "params": [0, 1]}]}),
     "optimizer state does not fit --optimizer (ValueError: the state was saved by an SGD-like optimizer"),
    (lambda saved: saved.update(arch=5), "not a DLRM checkpoint (arch is a int)"),
    (lambda saved: saved["train_state"].update(epoch="x", last_test=[1]), "its training state cannot be read"),
    (lambda saved: saved["train_state"].update(epoch="abc"), "its training state cannot be read (TypeError: epoch"),
    (lambda saved: saved["arch"].update(layers=[1]), "(its architecture record cannot be read)"),
])
def test_malformed_checkpoints_stop_with_one_line(adagrad_checkpoint, run_main, tmp_path, change, message):
    path = altered(adagrad_checkpoint, tmp_path / "bad.pt", change)
    code, out, err = run_main(*SMALL, "--optimizer=adagrad", "--nepochs=2", f"--load-model={path}")
    assert code == 1 and message in err and len(err.splitlines()) == 1 and "Finished" not in out


def test_a_checkpoint_without_optimizer_state_says_adagrad_starts_afresh(adagrad_checkpoint, run_main, tmp_path):
    path = altered(adagrad_checkpoint, tmp_path / "weights.pt", lambda saved: saved.pop("opt_state_dict"))
    code, out, err = run_main(*SMALL, "--optimizer=adagrad", "--nepochs=2", f"--load-model={path}")
    assert code == 0 and f"note: --load-model {path} holds no optimizer state" in err


def test_the_checkpoint_holds_the_keys_the_originals_loader_reads(adagrad_checkpoint):
    saved = torch.load(adagrad_checkpoint, weights_only=False)
    for key in ("state_dict", "iter", "epoch", "nepochs", "nbatches", "nbatches_test", "train_loss", "total_loss",
                "test_acc", "opt_state_dict"):
        assert key in saved, key


@pytest.mark.parametrize("flags,difference", [
    (["--qr-flag", "--qr-threshold=10"], "the embedding tables' parameters differ (emb_l.0.weight: saved 50x4, "
                                         "flags give none;"),
    (["--weighted-pooling=fixed"], "the embedding tables' parameters differ (pooling_weights.weight: saved none, "
                                   "flags give 120x1; --qr-flag, --md-flag and --weighted-pooling change them)"),
    (["--arch-mlp-top=16-1"], "--arch-mlp-top: saved 8-1, flags give 16-1)"),
    (["--arch-mlp-bot=3-6-8", "--arch-sparse-feature-size=8", "--arch-embedding-size=50-40-31"],
     "--arch-embedding-size (the tables' rows): saved 50-40-30, flags give 50-40-31; --arch-sparse-feature-size: "
     "saved 4, flags give 8; --arch-mlp-bot: saved 3-4, flags give 3-6-8)"),  # every difference
    (["--arch-interaction-op=cat"], "--arch-interaction-op: saved dot, flags give cat)"),
])
def test_a_checkpoint_of_another_architecture_is_refused_with_the_difference_named(adagrad_checkpoint, run_main,
                                                                                      flags, difference):
    code, _, err = run_main(*SMALL, "--optimizer=adagrad", f"--load-model={adagrad_checkpoint}", *flags)
    assert code == 1 and "saved with a different architecture than these flags (" + difference in err


def test_every_changed_interaction_option_is_named(run_main, tmp_path):
    path = tmp_path / "dcn.pt"
    dcn = [*SMALL, "--arch-interaction-op=dcn"]
    assert run_main(*dcn, "--dcn-num-layers=2", "--dcn-low-rank-dim=3", f"--save-model={path}")[0] == 0
    code, _, err = run_main(*dcn, "--dcn-num-layers=1", "--dcn-low-rank-dim=4", f"--load-model={path}")
    assert code == 1 and err.endswith("(--dcn-num-layers: saved 2, flags give 1; --dcn-low-rank-dim: saved 3, "
                                      "flags give 4)\n")


def test_a_resumed_run_whose_tests_do_not_improve_leaves_the_best_checkpoint_be(run_main, tmp_path):
    path = tmp_path / "best.pt"
    assert run_main(*SMALL, "--test-freq=2", f"--save-model={path}")[0] == 0
    best = path.read_bytes()
    code, out, err = run_main(*SMALL, "--test-freq=2", "--nepochs=2", "--learning-rate=0", f"--load-model={path}",
                              f"--save-model={path}")
    assert code == 0 and "Saving model" not in out and path.read_bytes() == best
    assert f"note: no test of this run improved on the loaded checkpoint's best; {path} (the loaded checkpoint) was " \
           "not written" in err
    elsewhere = tmp_path / "final.pt"  # another file: the final model, as a run without improvement writes it
    code, out, err = run_main(*SMALL, "--test-freq=2", "--nepochs=2", "--learning-rate=0", f"--load-model={path}",
                              f"--save-model={elsewhere}")
    assert code == 0 and f"Saving model to {elsewhere}" in out and elsewhere.exists()
    code, out, err = run_main(*SMALL, f"--load-model={path}")  # at the end of epoch 0 of 1
    assert code == 0 and "Finished training" not in out
    assert f"note: --load-model {path} is at epoch 0, batch 4: with --nepochs=1 of 4 batches there is nothing left" \
           in err


@pytest.mark.slow  # torch.optim imports torch._dynamo: seconds
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch.optim.Adagrad's own sparse tensors
def test_the_originals_per_table_adagrad_state_resumes_in_the_batched_tables():
    """The original's checkpoints hold torch.optim.Adagrad's state of one parameter per table, then the MLPs'."""
    torch.manual_seed(0)
    model = dlrm.DLRM_Net(4, np.array([5, 7, 3]), np.array([4, 8, 4]), np.array([10, 1]))
    sizes, starts = [5, 7, 3], [0, 5, 12]
    dense = list(model.parameters())[1:]
    tables = [w.detach().clone().requires_grad_() for w in model.emb_l.weight.split(sizes)]
    original = torch.optim.Adagrad([*tables, *(p.detach().clone().requires_grad_() for p in dense)], lr=0.1)
    ours = dlrm.make_optimizer("adagrad", model.parameters(), 0.1)
    for _ in range(3):  # the same gradients for both
        rows = [torch.randint(0, n, (4,)) for n in sizes]
        values = [torch.randn(4, 4) for _ in sizes]
        for table, r, v, n in zip(tables, rows, values, sizes):
            table.grad = torch.sparse_coo_tensor(r[None], v, (n, 4), check_invariants=True)
        model.emb_l.weight.grad = torch.sparse_coo_tensor(
            torch.cat([r + s for r, s in zip(rows, starts)])[None], torch.cat(values), (15, 4), check_invariants=True)
        for mine, theirs in zip(dense, original.param_groups[0]["params"][3:]):
            mine.grad = torch.randn_like(mine)
            theirs.grad = mine.grad.clone()
        original.step()
        ours.step()
    resumed = dlrm.make_optimizer("adagrad", model.parameters(), 0.1)
    resumed.load_state_dict(dlrm.from_original_optimizer_state(original.state_dict(), model))
    for p in model.parameters():
        torch.testing.assert_close(resumed.state[p]["sum"], ours.state[p]["sum"])

    rws = {"state": {t: {"step": 2, "momentum": torch.full((n,), float(t))} for t, n in enumerate(sizes)},
           "param_groups": [{"lr": 0.1, "lr_decay": 0, "eps": 1e-10, "params": list(range(3 + len(dense)))}]}
    resumed = dlrm.make_optimizer("rwsadagrad", model.parameters(), 0.1)  # the original's RWSAdagrad: per-row sums
    resumed.load_state_dict(dlrm.from_original_optimizer_state(rws, model, row_wise_sparse=True))
    assert resumed.state[model.emb_l.weight]["sum"].tolist() == [0.0] * 5 + [1.0] * 7 + [2.0] * 3
    del rws["state"][1]
    with pytest.raises(ValueError, match="optimizer state for some tables but not for all"):
        dlrm.from_original_optimizer_state(rws, model, row_wise_sparse=True)


def serialized(value):
    """`value` through torch.save and torch.load, as a checkpoint holds it (no tensor shared with a live one)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.slow  # torch.optim imports torch._dynamo: seconds
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_our_adagrad_and_sgd_state_resumes_in_the_originals_per_table_torch_optim():
    """Our checkpoints' optimizer state as the original's torch.optim.Adagrad / SGD over one parameter per table
    loads there and steps as ours does; back in ours it is the state it was."""
    torch.manual_seed(0)
    model = dlrm.DLRM_Net(4, np.array([5, 7, 3]), np.array([4, 8, 4]), np.array([10, 1]))
    sizes, starts = [5, 7, 3], [0, 5, 12]
    ours = dlrm.make_optimizer("adagrad", model.parameters(), 0.1)

    def gradients():
        rows = [torch.randint(0, n, (4,)) for n in sizes]
        values = [torch.randn(4, 4) for _ in sizes]
        model.emb_l.weight.grad = torch.sparse_coo_tensor(
            torch.cat([r + s for r, s in zip(rows, starts)])[None], torch.cat(values), (15, 4), check_invariants=True)
        for p in list(model.parameters())[1:]:
            p.grad = torch.randn_like(p)

    for _ in range(3):
        gradients()
        ours.step()
    saved = serialized(dlrm.to_original_optimizer_state(ours.state_dict(), model, updates=3))
    tables = [w.detach().clone().requires_grad_() for w in model.emb_l.weight.split(sizes)]
    dense = [p.detach().clone().requires_grad_() for p in list(model.parameters())[1:]]
    original = torch.optim.Adagrad([*tables, *dense], lr=0.5)
    original.load_state_dict(saved)
    assert original.param_groups[0]["lr"] == 0.1 and original.state[tables[1]]["step"].item() == 3.0
    gradients()
    for table, grad in zip(tables, model.emb_l.weight.grad.to_dense().split(sizes)):
        table.grad = grad.clone()
    for theirs, mine in zip(dense, list(model.parameters())[1:]):
        theirs.grad = mine.grad.clone()
    original.step()
    ours.step()
    torch.testing.assert_close(torch.cat([t.detach() for t in tables]), model.emb_l.weight.detach())
    for theirs, mine in zip(dense, list(model.parameters())[1:]):
        torch.testing.assert_close(theirs.detach(), mine.detach())
    resumed = dlrm.make_optimizer("adagrad", model.parameters(), 0.1)
    resumed.load_state_dict(dlrm.from_original_optimizer_state(
        dlrm.to_original_optimizer_state(ours.state_dict(), model, updates=4), model))
    for p in model.parameters():
        assert torch.equal(resumed.state[p]["sum"], ours.state[p]["sum"])

    sgd = dlrm.make_optimizer("sgd", model.parameters(), 0.1)
    torch.optim.SGD([*tables, *dense], lr=0.5).load_state_dict(
        dlrm.to_original_optimizer_state(sgd.state_dict(), model, updates=0))

    rws = dlrm.make_optimizer("rwsadagrad", model.parameters(), 0.1)
    gradients()
    rws.step()
    saved = dlrm.to_original_optimizer_state(rws.state_dict(), model, updates=1)
    assert [sorted(saved["state"][t]) for t in range(3)] == [["momentum", "step"]] * 3  # the original's RWSAdagrad
    assert [saved["state"][t]["momentum"].shape for t in range(3)] == [(5,), (7,), (3,)]
    assert saved["state"][3]["sum"].shape == (8, 4) and saved["state"][3]["step"] == 1
    assert set(saved["param_groups"][0]) == {"lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value",
                                             "params"}
    resumed = dlrm.make_optimizer("rwsadagrad", model.parameters(), 0.1)
    resumed.load_state_dict(dlrm.from_original_optimizer_state(saved, model, row_wise_sparse=True))
    assert torch.equal(resumed.state[model.emb_l.weight]["sum"], rws.state[model.emb_l.weight]["sum"])


def test_a_checkpoint_at_an_epochs_end_tells_the_original_the_end_of_that_epoch(run_main, tmp_path):
    """The original saves its position as (epoch, batches done); one past its epoch hangs its resume."""
    path = tmp_path / "end.pt"
    assert run_main(*SMALL, f"--save-model={path}")[0] == 0
    saved = torch.load(path, weights_only=False)
    assert (saved["epoch"], saved["iter"], saved["nbatches"]) == (0, 4, 4)
    assert (saved["train_state"]["epoch"], saved["train_state"]["next_batch"]) == (1, 0)


@pytest.mark.parametrize("name", ["adagrad", "rwsadagrad"])
def test_the_originals_adagrad_state_with_learned_pooling_weights_resumes(name):
    """With --weighted-pooling=learned the original's parameters are its tables, then one v_W_l.<k> [rows] per
    table (dense gradients: a `sum` of their shape in both Adagrads), then the MLPs'."""
    args = dlrm.parse_args(["--arch-embedding-size=5-7-3", "--arch-sparse-feature-size=4", "--arch-mlp-bot=4-8-4",
                            "--arch-mlp-top=16-1", "--weighted-pooling=learned", f"--optimizer={name}"])
    model = dlrm.build_model(args, 4, [5, 7, 3])
    params = list(model.parameters())
    assert [tuple(p.shape) for p in params[:4]] == [(5, 4), (7, 4), (3, 4), (15, 1)]
    sizes, mlps = [5, 7, 3], params[4:]
    table_sum = (lambda t, n: torch.full((n,), 10.0 + t)) if name == "rwsadagrad" else \
        (lambda t, n: torch.full((n, 4), 10.0 + t))
    state = {t: {"step": torch.tensor(3.0), ("momentum" if name == "rwsadagrad" else "sum"): table_sum(t, n)}
             for t, n in enumerate(sizes)}
    state.update({3 + t: {"step": torch.tensor(3.0), "sum": torch.full((n,), 20.0 + t)} for t, n in enumerate(sizes)})
    state.update({6 + k: {"step": torch.tensor(3.0), "sum": torch.full_like(p, 30.0 + k)} for k, p in enumerate(mlps)})
    saved = {"state": state, "param_groups": [{"lr": 0.1, "lr_decay": 0, "eps": 1e-10, "weight_decay": 0,
                                               "params": list(range(6 + len(mlps)))}]}
    optimizer = dlrm.make_optimizer(name, params, 0.1)
    optimizer.load_state_dict(dlrm.from_original_optimizer_state(saved, model, optimizer.row_wise_sparse))
    for t, table in enumerate(params[:3]):
        assert torch.equal(optimizer.state[table]["sum"], table_sum(t, sizes[t]))
    pooling = optimizer.state[params[3]]["sum"]
    assert pooling.shape == ((15,) if name == "rwsadagrad" else (15, 1))
    assert pooling.reshape(-1).tolist() == [20.0] * 5 + [21.0] * 7 + [22.0] * 3
    for k, p in enumerate(mlps):
        assert torch.equal(optimizer.state[p]["sum"], torch.full_like(p, 30.0 + k))


def test_a_checkpoint_at_the_end_of_an_epoch_takes_changes_for_the_next(run_main, tmp_path):
    path = tmp_path / "end.pt"
    code, _, err = run_main(*SMALL, "--test-freq=4", f"--save-model={path}")  # tests (and saves) after batch 4 of 4
    assert code == 0, err
    assert torch.load(path, weights_only=False)["iter"] == 4
    code, out, err = run_main(*SMALL, "--nepochs=2", "--numpy-rand-seed=5", "--print-freq=4", f"--load-model={path}")
    assert code == 0, err
    assert "note: --numpy-rand-seed was 123 in the checkpoint, now 5 (it is at the end of epoch 0)" in out
    assert "Finished training it 4/4 of epoch 1" in out
    path = tmp_path / "short.pt"  # --num-batches shortened the saving run's epoch: the rest of it is still to train
    code, _, err = run_main(*SMALL, "--test-freq=2", "--num-batches=2", f"--save-model={path}")
    assert code == 0, err
    code, out, err = run_main(*SMALL, "--numpy-rand-seed=5", f"--load-model={path}")
    assert code == 1 and "--numpy-rand-seed was 123, now 5: the rest of epoch 0 would skip or repeat rows" in err


@pytest.mark.parametrize("trick,keys", [
    (["--weighted-pooling=learned"], {"v_W_l.0": [10], "v_W_l.1": [20], "v_W_l.2": [30]}),
    (["--weighted-pooling=fixed"], {}),
    (["--qr-flag", "--qr-threshold=15"], {"emb_l.1.weight_q": [5, 4], "emb_l.1.weight_r": [4, 4],  # 4 collisions
                                           "emb_l.2.weight_q": [8, 4], "emb_l.2.weight_r": [4, 4]}),
])
def test_checkpoints_name_embedding_tricks_as_the_original_and_load_back(run_main, tmp_path, trick, keys):
    """The original loads our checkpoints (strictly): its names, and no fixed pooling weights (all 1)."""
    flags = ["--arch-embedding-size=10-20-30", "--arch-sparse-feature-size=4", "--arch-mlp-bot=4-8-4",
             "--arch-mlp-top=8-1", "--data-size=64", "--mini-batch-size=16", *trick]
    code, _, err = run_main(*flags, "--num-batches=2", f"--save-model={tmp_path / 'm.pt'}", "--test-freq=2")
    assert code == 0, err
    saved = torch.load(tmp_path / "m.pt", weights_only=False)["state_dict"]
    tricks = {k: list(v.shape) for k, v in saved.items() if k.startswith("v_W_l") or k.endswith(("_q", "_r"))}
    assert tricks == keys and not any(k.startswith("pooling_weights") or ".embs_" in k for k in saved)
    code, resumed, err = run_main(*flags, "--print-freq=1", f"--load-model={tmp_path / 'm.pt'}")
    code_full, full, _ = run_main(*flags, "--print-freq=1")
    assert code == code_full == 0, err
    assert resumed.splitlines()[-2:] == full.splitlines()[-2:]


@pytest.mark.parametrize("operation,noted", [("mult", True), ("add", False)])
def test_loading_the_originals_qr_mult_checkpoint_notes_how_bags_differ(run_main, tmp_path, operation, noted):
    flags = ["--arch-embedding-size=10-20-30", "--arch-sparse-feature-size=4", "--arch-mlp-bot=4-8-4",
             "--arch-mlp-top=8-1", "--data-size=64", "--mini-batch-size=16", "--qr-flag", "--qr-threshold=15",
             f"--qr-operation={operation}"]
    model = dlrm.build_model(dlrm.parse_args(flags), 4, [10, 20, 30])
    torch.save({"state_dict": dlrm.to_original_keys(model.state_dict(), model), "epoch": 0, "iter": 0},
               tmp_path / "original.pt")  # the original's checkpoint: no train_state
    code, _, err = run_main(*flags, "--inference-only", f"--load-model={tmp_path / 'original.pt'}")
    assert code == 0, err
    assert ("note: --load-model " + str(tmp_path / "original.pt") + ": the original's QR tables (--qr-operation=mult) "
            "multiply a bag's pooled quotient and remainder embeddings" in err) == noted


@pytest.mark.parametrize("trick", [["--weighted-pooling=learned"], ["--weighted-pooling=fixed"],
                                   ["--qr-flag", "--qr-threshold=15"]])
def test_the_originals_names_of_embedding_tricks_load(trick):
    """The original saves learned pooling weights as v_W_l.<k> ([rows]), fixed ones not at all, QR tables as
    emb_l.<k>.weight_q / weight_r."""
    args = dlrm.parse_args(["--arch-embedding-size=10-20-30", "--arch-sparse-feature-size=4", "--arch-mlp-bot=4-8-4",
                            "--arch-mlp-top=8-1", *trick])
    torch.manual_seed(1)
    saved = dlrm.build_model(args, 4, [10, 20, 30]).state_dict()
    if "pooling_weights.weight" in saved:
        saved["pooling_weights.weight"] = torch.rand_like(saved["pooling_weights.weight"])
    original = {}
    for key, value in saved.items():
        if key == "pooling_weights.weight":
            if "learned" in trick[0]:
                original.update({f"v_W_l.{k}": rows.reshape(-1) for k, rows in enumerate(value.split([10, 20, 30]))})
            continue
        original[key.replace(".embs_q.weight", ".weight_q").replace(".embs_r.weight", ".weight_r")] = value
    model = dlrm.build_model(args, 4, [10, 20, 30])
    model.load_state_dict(dlrm.from_original_keys(original, model))
    for key, value in model.state_dict().items():
        expected = torch.ones_like(value) if key == "pooling_weights.weight" and "fixed" in trick[0] else saved[key]
        assert torch.equal(value, expected), key
