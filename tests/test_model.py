"""DLRM_Net against naive references: interactions, embedding-bag offsets, arch checks."""

import numpy as np
import pytest
import torch

import dlrm_data
from dlrm_s_pytorch import DLRM_Net, DLRMError, interaction_width


def make_net(op="dot", itself=False, tables=(5, 7, 3), dim=4, bot=(3, 6, 4), top=(8, 1)):
    torch.manual_seed(0)
    width = interaction_width(op, itself, len(tables), bot[-1], dim)
    return DLRM_Net(dim, list(tables), list(bot), [width, *top], arch_interaction_op=op,
                    arch_interaction_itself=itself, sigmoid_top=len(top) - 1)


def naive_dot_interaction(x, ly, itself):
    """Loops: [x, e_i . e_j for i > j (or i >= j)] in the original's row-major order."""
    features = [x] + [ly[:, t] for t in range(ly.shape[1])]
    rows = []
    for b in range(x.shape[0]):
        pairs = []
        for i in range(len(features)):
            for j in range(i + 1 if itself else i):
                pairs.append(float(features[i][b] @ features[j][b]))
        rows.append(torch.cat([x[b], torch.tensor(pairs)]))
    return torch.stack(rows)


@pytest.mark.parametrize("itself", [False, True])
def test_dot_interaction_matches_naive(itself):
    net = make_net("dot", itself)
    x, ly = torch.randn(5, 4), torch.randn(5, 3, 4)
    torch.testing.assert_close(net.interact_features(x, ly), naive_dot_interaction(x, ly, itself))
    expected_width = 4 + (4 * 5 // 2 if itself else 4 * 3 // 2)
    assert net.interact_features(x, ly).shape == (5, expected_width)


@pytest.mark.parametrize("itself", [False, True])
def test_dot_interaction_gradients_match_naive(itself):
    """The symmetric backward (one bmm) gives autograd's gradients through the naive products."""
    net = make_net("dot", itself)
    torch.manual_seed(1)
    x, ly = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    upstream = torch.randn(5, 4 + (10 if itself else 6), dtype=torch.float64)

    def grads(interaction):
        xg, lyg = x.clone().requires_grad_(), ly.clone().requires_grad_()
        (interaction(xg, lyg) * upstream).sum().backward()
        return xg.grad, lyg.grad

    def naive(xg, lyg):
        features = torch.cat([xg.unsqueeze(1), lyg], dim=1)
        pairs = [(features[:, i] * features[:, j]).sum(1) for i in range(4) for j in range(i + 1 if itself else i)]
        return torch.cat([xg, torch.stack(pairs, dim=1)], dim=1)

    fast, reference = grads(net.interact_features), grads(naive)
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the products run in float32


def test_cat_interaction_is_concatenation():
    net = make_net("cat", top=(16, 1))
    x, ly = torch.randn(2, 4), torch.randn(2, 3, 4)
    expected = torch.cat([x, ly[:, 0], ly[:, 1], ly[:, 2]], dim=1)
    torch.testing.assert_close(net.interact_features(x, ly), expected)


def test_embedding_bags_sum_rows_named_by_offsets():
    net = make_net()
    lengths = [np.array([2, 0, 1]), np.array([1, 3, 1]), np.array([1, 1, 2])]
    indices = [np.array([4, 0, 2]), np.array([6, 1, 1, 0, 2]), np.array([2, 0, 1, 2])]
    batch = dlrm_data.batch_from_tables(np.zeros((3, 3)), lengths, indices, np.zeros(3))
    pooled = net.apply_emb(batch.sparse)
    for t, bag in enumerate(net.emb_l):
        start = 0
        for b, n in enumerate(lengths[t]):
            rows = indices[t][start:start + n]
            expected = bag.weight[torch.as_tensor(rows)].sum(0) if n else torch.zeros(4)
            torch.testing.assert_close(pooled[b, t], expected)
            start += n


def test_forward_accepts_original_per_table_layout():
    net = make_net()
    ds = dlrm_data.RandomDataset(3, [5, 7, 3], 8, 4, seed=1)
    batch = ds[0]
    flat = net(batch.dense_x, batch.offsets, batch.indices)
    per_table = net(batch.dense_x, batch.lS_o, batch.lS_i)
    as_lists = net(batch.dense_x, list(batch.lS_o), batch.lS_i)
    torch.testing.assert_close(flat, per_table)
    torch.testing.assert_close(flat, as_lists)
    assert flat.shape == (4, 1) and bool(((flat > 0) & (flat < 1)).all())


def test_loss_threshold_clamps_output():
    torch.manual_seed(0)
    net = DLRM_Net(4, [5, 7, 3], [3, 6, 4], [10, 1], sigmoid_top=0, loss_threshold=0.4)
    batch = dlrm_data.RandomDataset(3, [5, 7, 3], 64, 64, seed=1)[0]
    out = net(batch.dense_x, batch.offsets, batch.indices)
    # the clamp is in float32: 1 - 0.4 is 0.6f there, a hair above the double 0.6
    low, high = float(torch.tensor(0.4)), float(torch.tensor(0.6))
    assert float(out.detach().min()) >= low and float(out.detach().max()) <= high


def test_arch_mismatch_errors_state_both_numbers():
    with pytest.raises(DLRMError, match="arch-sparse-feature-size 4 does not match last dim of bottom mlp 5"):
        DLRM_Net(4, [5, 7, 3], [3, 5], [11, 1])
    with pytest.raises(DLRMError, match="# of feature interactions 10 does not match first dim of top mlp 12"):
        DLRM_Net(4, [5, 7, 3], [3, 4], [12, 1])


def test_the_originals_model_code_runs_unchanged():
    """How the original's script builds and calls DLRM_Net: list-valued m_spa for mixed dimensions
    (from md_solver), its keywords, sequential_forward, apply_mlp, a list of pooled embeddings."""
    from dlrmkit.tricks import md_solver

    ln_emb = np.array([500, 40, 3])
    m_spa = md_solver(ln_emb, 0.3, 4)  # as the original's main does with --md-flag
    assert m_spa[0] < 4
    width = interaction_width("dot", False, 3, 4, 4)
    torch.manual_seed(0)
    net = DLRM_Net(m_spa, ln_emb, np.array([3, 6, 4]), np.array([width, 1]), arch_interaction_op="dot",
                   arch_interaction_itself=False, sigmoid_bot=-1, sigmoid_top=0, sync_dense_params=True,
                   loss_threshold=0.0, ndevices=-1, qr_flag=False, md_flag=True, md_threshold=30,
                   loss_function="bce")
    assert net.emb_l[0].embs.weight.shape == (500, m_spa[0]) and net.emb_l[2].weight.shape == (3, 4)
    batch = dlrm_data.RandomDataset(3, list(ln_emb), 5, 5, seed=2)[0]
    z = net.sequential_forward(batch.dense_x, batch.lS_o, batch.lS_i)
    torch.testing.assert_close(z, net(batch.dense_x, batch.sparse))
    x = net.apply_mlp(batch.dense_x, net.bot_l)
    ly = net.apply_emb(batch.sparse)
    torch.testing.assert_close(net.interact_features(x, [ly[:, t] for t in range(3)]), net.interact_features(x, ly))
    with pytest.raises(DLRMError, match="needs md_flag=True and one dimension per table"):
        DLRM_Net([2, 4], ln_emb, [3, 6, 4], [width, 1])


def test_a_given_collection_sets_the_width_and_excludes_the_table_keywords():
    from dlrmkit.embeddings import BatchedEmbeddingBags

    width = interaction_width("dot", False, 3, 4, 4)
    net = DLRM_Net(ln_bot=[3, 4], ln_top=[width, 1], embeddings=BatchedEmbeddingBags([5, 7, 3], 4))
    assert net.embedding_dim == 4 and net.table_sizes == [5, 7, 3]
    with pytest.raises(DLRMError, match="arch-sparse-feature-size 8 does not match last dim of bottom mlp 4"):
        DLRM_Net(8, None, [3, 4], [width, 1], embeddings=BatchedEmbeddingBags([5, 7, 3], 8))
    with pytest.raises(DLRMError, match="either as `embeddings` or through the QR / MD keywords"):
        DLRM_Net(4, None, [3, 4], [width, 1], embeddings=BatchedEmbeddingBags([5, 7, 3], 4), qr_flag=True)


def test_saturated_predictions_still_get_the_bce_gradient_of_their_logits():
    """Predictions pushed to exactly 0 or 1 (one large step can do it) must be able to come back: the
    logits' gradient is p - y, as BCE with logits gives, not the 0 of sigmoid's float32 slope."""
    from dlrm_s_pytorch import ClickProbability, per_sample_loss

    z = torch.tensor([[40.0], [-40.0], [30.0], [2.0], [-3.0]], requires_grad=True)
    y = torch.tensor([[0.0], [1.0], [1.0], [1.0], [0.0]])
    per_sample_loss("bce", ClickProbability()(z), y).sum().backward()
    p = torch.sigmoid(z.detach())
    assert torch.allclose(z.grad, p - y, atol=1e-6)
    assert z.grad[0, 0] == pytest.approx(1.0) and z.grad[1, 0] == pytest.approx(-1.0)

    # elsewhere bit for bit nn.Sigmoid's gradient, for any loss
    z_ref = torch.linspace(-16, 16, 101).reshape(-1, 1).requires_grad_()
    z_ours = z_ref.detach().clone().requires_grad_()
    y = (torch.arange(101) % 2).float().reshape(-1, 1)
    for kind in ("bce", "mse"):
        z_ref.grad = z_ours.grad = None
        per_sample_loss(kind, torch.nn.Sigmoid()(z_ref), y).sum().backward()
        per_sample_loss(kind, ClickProbability()(z_ours), y).sum().backward()
        assert torch.equal(z_ref.grad, z_ours.grad)


def test_click_probability_takes_the_plain_sigmoid_when_no_logit_is_near_saturation():
    """The common batch costs what nn.Sigmoid costs; a batch with one logit near saturation, an infinite or a
    NaN one, takes the saturation-safe path (the whole batch: its gradient stays nn.Sigmoid's elsewhere)."""
    from dlrm_s_pytorch import ClickProbability, _SaturationSafeSigmoid

    low, high = ClickProbability.UNSATURATED_LOGITS
    inside = torch.tensor([[low + 0.01], [0.0], [high - 0.01]])
    p = torch.sigmoid(inside)
    assert ((1 - p) * p).min() > 10 * 1e-12  # the bounds keep far from the slope the safe path replaces
    cases = [(torch.float32, None, False), (torch.float64, None, False), (torch.float32, high + 1, True),
             (torch.float32, low - 1, True), (torch.float32, float("inf"), True), (torch.float32, float("nan"), True),
             (torch.bfloat16, None, True)]  # bfloat16 rounds p to 1 from about 6.2
    for dtype, extra, safe in cases:
        z = inside if extra is None else torch.cat([inside, torch.tensor([[extra]])])
        z = z.detach().to(dtype).clone().requires_grad_()
        out = ClickProbability()(z)
        assert (type(out.grad_fn).__name__ != "SigmoidBackward0") == safe, (dtype, extra)
        out.sum().backward()
        z_safe = z.detach().clone().requires_grad_()
        _SaturationSafeSigmoid.apply(z_safe).sum().backward()
        assert torch.equal(z.grad, z_safe.grad) or extra != extra  # NaN: NaN gradients either way
    z = torch.tensor([[10.0]], dtype=torch.bfloat16, requires_grad=True)  # p rounds to 1 in bfloat16
    ClickProbability()(z).sum().backward()
    assert z.grad.item() > 0  # the BCE epsilon's slope, not sigmoid's 0


def test_wbce_weighs_a_sample_by_its_target_truncated_as_the_original():
    """The original's loss_ws[T.long()]: targets below 1 (random data's) count as negatives."""
    z = torch.tensor([[0.3], [0.6], [0.9], [0.2]])
    target = torch.tensor([[0.0], [0.7], [1.0], [0.49]])
    weights = torch.tensor([0.25, 4.0])
    bce = -(target * torch.log(z) + (1 - target) * torch.log(1 - z))
    expected = torch.tensor([[0.25], [0.25], [4.0], [0.25]]) * bce
    from dlrm_s_pytorch import per_sample_loss

    torch.testing.assert_close(per_sample_loss("wbce", z, target, weights), expected)
