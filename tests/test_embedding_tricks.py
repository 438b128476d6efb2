"""QR and MD embeddings (parameter counts of the papers, training), weighted pooling, sum_bags."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import dlrm_data
import dlrm_s_pytorch as dlrm
from dlrmkit.optim import make_optimizer
from helpers import planted_dataset
from dlrmkit.tricks import PrEmbeddingBag, QREmbeddingBag, md_solver
from dlrmkit.embeddings import sum_bags

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

TABLES = (500, 300, 10)


def embedding_parameters(model):
    return sum(p.numel() for p in model.emb_l.parameters())


def qr_formula(n, d, m):
    """Shi et al.: a quotient table of ceil(n/m) rows and a remainder table of m rows, D columns each."""
    return (math.ceil(n / m) + m) * d


def planted_args(*extra):
    return dlrm.parse_args(["--arch-sparse-feature-size=8", "--arch-mlp-bot=4-16-8", "--arch-mlp-top=16-1",
                            "--loss-function=bce", "--optimizer=adagrad", "--learning-rate=0.1", "--nepochs=2",
                            "--mini-batch-size=64", *extra])


def train_and_evaluate(args, tables=TABLES):
    torch.manual_seed(0)
    train_set = planted_dataset(3000, 64, seed=1, tables=tables)
    test_set = planted_dataset(2000, 1000, seed=2, tables=tables)
    model = dlrm.build_model(args, 4, tables)
    device = torch.device("cpu")
    before = dlrm.evaluate(model, test_set, "bce", None, device)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.learning_rate)
    dlrm.train(args, model, optimizer, train_set, test_set, device, dlrm.TrainState(), len(train_set),
               log=lambda s: None)
    return model, before, dlrm.evaluate(model, test_set, "bce", None, device)


@pytest.mark.slow
@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_qr_parameter_count_matches_the_paper_and_the_model_learns(operation):
    dim = 8
    extra = ["--qr-flag", f"--qr-operation={operation}", "--qr-collisions=7", "--qr-threshold=100"]
    if operation == "concat":
        extra.append("--arch-mlp-bot=4-16-16")  # the bottom MLP must give 2x the embedding dim
    model, before, after = train_and_evaluate(planted_args(*extra))
    small_table_dim = 2 * dim if operation == "concat" else dim
    expected = qr_formula(500, dim, 7) + qr_formula(300, dim, 7) + 10 * small_table_dim
    assert embedding_parameters(model) == expected
    assert isinstance(model.emb_l[0], QREmbeddingBag) and isinstance(model.emb_l[2], nn.EmbeddingBag)
    assert after.auc > 0.65 and after.loss < before.loss


def test_qr_embedding_of_a_bag_is_the_sum_of_composed_rows():
    torch.manual_seed(0)
    bag = QREmbeddingBag(23, 3, 5, operation="mult")
    indices = torch.tensor([22, 0, 7, 7, 13, 4])
    offsets = torch.tensor([0, 3, 3, 5])  # bags of 3, 0, 2, 1 ids
    weights = torch.tensor([0.5, 1.0, 2.0, 1.0, 3.0, 1.0])
    q, r = bag.embs_q.weight, bag.embs_r.weight
    rows = torch.stack([q[i // 5] * r[i % 5] for i in indices.tolist()]) * weights[:, None]
    expected = torch.stack([rows[0:3].sum(0), torch.zeros(3), rows[3:5].sum(0), rows[5]])
    torch.testing.assert_close(bag(indices, offsets, per_sample_weights=weights), expected)


def test_md_solver_follows_the_alpha_power_rule():
    sizes = [10, 1000, 100, 100000]
    dims = md_solver(sizes, alpha=0.3, d0=16)
    expected = [max(1, min(16, round(16 * (10 / n) ** 0.3))) for n in sizes]
    assert dims == expected == [16, 4, 8, 1]
    assert md_solver(sizes, alpha=0.3, d0=16, round_dim=True) == [16, 4, 8, 1]
    # powers of two, never above the base dimension: 7 -> 8, 12 -> 16 capped at 12
    assert md_solver([10, 30], alpha=0.5, d0=12) == [12, 7]
    assert md_solver([10, 30], alpha=0.5, d0=12, round_dim=True) == [12, 8]
    # float32 as the original: 8 * sqrt(5400 / 55296) is 2.5 in exact arithmetic, just above it in float32
    assert md_solver([5400, 21211, 55296], alpha=0.5, d0=8) == [8, 4, 3]
    with torch.device("meta"):  # a distributed save builds the whole model on the meta device
        assert md_solver([5400, 21211, 55296], alpha=0.5, d0=8) == [8, 4, 3]


@pytest.mark.slow
def test_md_parameter_count_matches_the_paper_and_the_model_learns():
    args = planted_args("--md-flag", "--md-threshold=100", "--md-temperature=0.3")
    model, before, after = train_and_evaluate(args)
    dims = md_solver(TABLES, 0.3, 8)
    # Ginart et al.: n_i x d_i rows plus a d_i x d0 projection, for tables above the threshold
    expected = sum(n * d + (d * 8 if d < 8 else 0) if n > 100 else n * 8 for n, d in zip(TABLES, dims))
    assert dims[0] < 8 and embedding_parameters(model) == expected
    assert isinstance(model.emb_l[0], PrEmbeddingBag) and model.emb_l[0].embs.weight.shape == (500, dims[0])
    assert after.auc > 0.65 and after.loss < before.loss


def test_md_table_projects_pooled_rows():
    torch.manual_seed(0)
    bag = PrEmbeddingBag(20, 2, 6)
    indices, offsets = torch.tensor([3, 19, 3, 0]), torch.tensor([0, 2, 2])
    pooled = torch.stack([bag.embs.weight[[3, 19]].sum(0), torch.zeros(2), bag.embs.weight[[3, 0]].sum(0)])
    torch.testing.assert_close(bag(indices, offsets), pooled @ bag.proj.weight.T)


def test_qr_concat_needs_twice_the_embedding_dim_in_the_bottom_mlp(run_main):
    code, _, err = run_main("--qr-flag", "--qr-operation=concat", "--qr-threshold=2")
    assert code == 1 and "2 arch-sparse-feature-size 4 does not match last dim of bottom mlp 2" in err
    code, out, _ = run_main("--qr-flag", "--qr-operation=concat", "--qr-threshold=2", "--arch-mlp-bot=4-3-4",
                            "--mini-batch-size=2", "--data-size=4")
    assert code == 0 and out.count("Finished training it") == 2


def test_weighted_pooling_fixed_equals_plain_and_learned_weights_train():
    torch.manual_seed(0)
    plain = dlrm.build_model(planted_args(), 4, TABLES)
    fixed = dlrm.build_model(planted_args("--weighted-pooling=fixed"), 4, TABLES)
    learned = dlrm.build_model(planted_args("--weighted-pooling=learned"), 4, TABLES)
    state = plain.state_dict()
    fixed.load_state_dict(state, strict=False)
    learned.load_state_dict(state, strict=False)
    batch = dlrm_data.RandomDataset(4, list(TABLES), 16, 16, seed=3)[0]
    reference = plain(batch.dense_x, batch.offsets, batch.indices)
    torch.testing.assert_close(fixed(batch.dense_x, batch.offsets, batch.indices), reference)
    assert "pooling_weights.weight" in fixed.state_dict() and not list(fixed.pooling_weights.parameters())

    # a bag sums weight[row] * E[row]: compare with a naive sum for set weights
    with torch.no_grad():
        learned.pooling_weights.weight.uniform_(0.0, 2.0)
    pooled = learned.apply_emb(batch.sparse)
    lengths = torch.diff(batch.offsets).view(3, 16)
    per_table = batch.lS_i
    starts = [0] + list(np.cumsum([n for n in TABLES]))
    for t in range(3):
        position = 0
        for b in range(16):
            rows = per_table[t][position:position + lengths[t, b]]
            weights = learned.pooling_weights.weight[starts[t] + rows, 0]
            expected = (learned.emb_l[t].weight[rows] * weights[:, None]).sum(0)
            torch.testing.assert_close(pooled[b, t], expected)
            position += int(lengths[t, b])

    before = learned.pooling_weights.weight.detach().clone()
    optimizer = make_optimizer("adagrad", learned.parameters(), 0.1)
    learned(batch.dense_x, batch.offsets, batch.indices).sum().backward()
    assert learned.pooling_weights.weight.grad.is_sparse
    optimizer.step()
    changed = (learned.pooling_weights.weight.detach() != before).squeeze(1)
    table_starts = torch.repeat_interleave(torch.tensor(starts[:3]), torch.diff(batch.offsets[::16]))
    used = torch.unique(batch.indices + table_starts)
    assert changed.nonzero().squeeze(1).tolist() == used.tolist()


@pytest.mark.parametrize("flag", ["--weighted-pooling=learned", "--md-flag", "--qr-flag"])
def test_embedding_flags_train_from_the_command_line_and_checkpoint(run_main, tmp_path, flag):
    argv = [flag, "--md-threshold=2", "--qr-threshold=2", "--arch-embedding-size=40-3-30", "--mini-batch-size=4",
            "--data-size=16", "--optimizer=rwsadagrad", "--learning-rate=0.1", f"--save-model={tmp_path / 'm.pt'}"]
    code, out, _ = run_main(*argv)
    assert code == 0 and out.count("Finished training it") == 4
    code, out, err = run_main(*argv[:-1], f"--load-model={tmp_path / 'm.pt'}", "--inference-only")
    assert code == 0 and "Testing for inference only\n accuracy" in out, err


def test_sum_bags_matches_embedding_bag_with_empty_bags():
    torch.manual_seed(0)
    table = torch.randn(9, 4)
    indices = torch.tensor([1, 8, 8, 0, 3])
    weights = torch.rand(5)
    for offsets in ([0, 0, 2, 5, 5], [0, 5, 5], [0, 1, 2, 3, 4]):
        offsets = torch.tensor(offsets)
        expected = nn.functional.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)
        torch.testing.assert_close(sum_bags(table[indices], offsets, weights), expected)
