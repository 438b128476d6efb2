"""LR schedule values and AUC against independent references."""

import math

import numpy as np
import pytest
import torch

from dlrm_s_pytorch import lr_for_update, roc_auc


def original_policy(num_updates, base, warmup, decay_start, num_decay):
    """The original LRPolicyScheduler's rule, stepped like a torch scheduler (step count starts at 1)."""
    lrs, last = [], base
    for step_count in range(1, num_updates + 1):
        if step_count < warmup:
            lr = base * (1.0 - (warmup - step_count) / warmup)
        elif decay_start <= step_count < decay_start + num_decay:
            lr = max(1e-7, base * ((num_decay - (step_count - decay_start)) / num_decay) ** 2)
        elif num_decay > 0 and step_count >= decay_start + num_decay:
            lr = last
        else:
            lr = base
        lrs.append(lr)
        last = lr
    return lrs


@pytest.mark.parametrize("warmup,start,decay", [(0, 0, 0), (4, 4, 0), (5, 5, 6), (3, 3, 4), (0, 0, 5)])
def test_lr_schedule_matches_original_rule(warmup, start, decay):
    ours = [lr_for_update(u, 0.5, warmup, start, decay) for u in range(1, 21)]
    assert ours == pytest.approx(original_policy(20, 0.5, warmup, start, decay))


def test_lr_schedule_shape():
    lrs = [lr_for_update(u, 1.0, 4, 6, 4) for u in range(1, 13)]
    assert lrs[:3] == pytest.approx([0.25, 0.5, 0.75])  # linear warmup
    assert lrs[3:5] == pytest.approx([1.0, 1.0])  # plateau until the decay starts
    assert lrs[5:9] == pytest.approx([1.0, 0.5625, 0.25, 0.0625])  # ((N - k) / N)^2
    assert lrs[9:] == pytest.approx([0.0625] * 3)  # frozen at the last decayed value


def test_auc_matches_sklearn_with_ties():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000).astype(np.float32)
    scores = np.round(rng.random(2000) * 0.5 + labels * 0.2, 2).astype(np.float32)  # many ties
    ours = roc_auc(torch.from_numpy(scores), torch.from_numpy(labels))
    assert ours == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_auc_edge_cases():
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0])) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) == 0.5
    assert math.isnan(roc_auc(torch.tensor([0.3, 0.7]), torch.tensor([1.0, 1.0])))
