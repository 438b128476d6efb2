"""The sparse batch type, the embedding-collection interface and the interaction registry."""

import numpy as np
import pytest
import torch

import dlrm_data
import dlrm_s_pytorch as dlrm
import extend_distributed as ext_dist
from dlrmkit import interactions, quantization
from dlrmkit.embeddings import BatchedEmbeddingBags, EmbeddingBagList
from dlrmkit.sparse import SparseFeatures

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

TABLES = [6, 1, 9, 4]


def jagged(batch_size=5, tables=TABLES, seed=0, weights=False):
    """Random bags of 0..3 ids per (table, sample), as per-table Python lists and as SparseFeatures."""
    rng = np.random.default_rng(seed)
    bags = [[rng.integers(0, n, rng.integers(0, 4)).tolist() for _ in range(batch_size)] for n in tables]
    lengths = [len(bag) for table in bags for bag in table]
    ids = [i for table in bags for bag in table for i in bag]
    w = torch.from_numpy(rng.random(len(ids)).astype(np.float32)) if weights else None
    return bags, SparseFeatures.from_lengths(lengths, ids, batch_size, weights=w)


def test_per_table_views_are_the_bags():
    bags, sf = jagged()
    assert sf.num_tables == len(TABLES) and sf.batch_size == 5
    for t, (ids, offsets, _) in enumerate(sf.tables()):
        same = sf.table(t)
        assert torch.equal(ids, same[0]) and torch.equal(offsets, same[1])
        ends = offsets.tolist()[1:] + [len(ids)]
        assert [ids[a:b].tolist() for a, b in zip(offsets.tolist(), ends)] == bags[t]


@pytest.mark.parametrize("tables", [[2, 0], [3], [], [0, 1, 2, 3]])
def test_select_tables_keeps_those_bags_in_that_order(tables):
    bags, sf = jagged(weights=True)
    part = sf.select_tables(tables)
    assert part.num_tables == len(tables) and part.batch_size == sf.batch_size
    assert part.offsets.shape == (len(tables) * 5 + 1,) and int(part.offsets[-1]) == part.indices.numel()
    for k, (ids, _, weights) in enumerate(part.tables()):
        t = tables[k]
        assert ids.tolist() == [i for bag in bags[t] for i in bag]
        assert torch.equal(weights, sf.table(t)[2])


def test_index_rows_traced_equals_eager():
    _, sf = jagged()
    first_row = torch.tensor([0, 6, 7, 16])
    expected = torch.cat([ids + first_row[t] for t, (ids, _, _) in enumerate(sf.tables())])
    assert torch.equal(sf.index_rows(first_row), expected)
    traced = torch.jit.trace(lambda i, o: SparseFeatures(i, o, 5, len(TABLES)).index_rows(first_row),
                             (sf.indices, sf.offsets), check_trace=False)
    assert torch.equal(traced(sf.indices, sf.offsets), expected)


def test_original_layout_and_one_hot_convert():
    _, sf = jagged()
    lS_o = torch.stack([offsets for _, offsets, _ in sf.tables()])
    lS_i = [ids for ids, _, _ in sf.tables()]
    back = SparseFeatures.from_original(lS_o, lS_i, batch_size=5)
    assert torch.equal(back.offsets, sf.offsets) and torch.equal(back.indices, sf.indices)
    one_hot = SparseFeatures.one_hot(np.array([[1, 2], [3, 4], [5, 6]]))
    assert one_hot.indices.tolist() == [1, 3, 5, 2, 4, 6] and one_hot.lengths().tolist() == [1] * 6


def test_a_distributed_shard_is_a_batch_of_the_same_type():
    batch = dlrm_data.RandomDataset(3, TABLES, 8, 8, seed=1)[0]
    shard = ext_dist.shard_batch(batch, rank=1, num_ranks=3, tables=[3, 0])
    assert type(shard) is dlrm_data.Batch
    assert shard.batch_size == 3 and shard.global_batch_size == 8 and shard.num_tables == 2
    assert torch.equal(shard.dense_x, batch.dense_x[3:6])
    assert shard.lS_i[0].tolist() == batch.lS_i[3].tolist() and shard.lS_i[1].tolist() == batch.lS_i[0].tolist()


def test_a_collection_of_no_tables_pools_to_nothing():
    """What a process of a model-parallel run holds when every table lives elsewhere."""
    empty = BatchedEmbeddingBags([10, 20], 4, tables=[])
    sf = SparseFeatures.from_lengths(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 3)
    assert len(empty) == 0 and empty(sf).shape == (3, 0, 4)


def collections():
    torch.manual_seed(0)
    qr = dlrm.create_embeddings(TABLES, 4, qr_flag=True, qr_collisions=2, qr_threshold=3)
    md = dlrm.create_embeddings(TABLES, 4, md_flag=True, md_threshold=3)
    quantized = BatchedEmbeddingBags(TABLES, 4).to_per_table()
    quantization.quantize_embeddings(quantized, 8)
    return {"batched": BatchedEmbeddingBags(TABLES, 4), "per-table": EmbeddingBagList(TABLES, 4),
            "qr": qr, "md": md, "quantized": quantized}


@pytest.mark.parametrize("name", ["batched", "per-table", "qr", "md", "quantized"])
def test_every_collection_pools_as_its_rows_say(name):
    """forward(sparse) == the sum of table_rows over each bag (weights included); to_per_table agrees."""
    collection = collections()[name]
    _, sf = jagged(weights=name != "quantized" or None)
    with torch.no_grad():
        pooled = collection(sf)
        assert pooled.shape == (5, len(TABLES), collection.embedding_dim)
        for t, (ids, offsets, weights) in enumerate(sf.tables()):
            rows = collection.table_rows(t, ids)
            if weights is not None:
                rows = rows * weights[:, None]
            ends = offsets.tolist()[1:] + [len(ids)]
            for b, (lo, hi) in enumerate(zip(offsets.tolist(), ends)):
                torch.testing.assert_close(pooled[b, t], rows[lo:hi].sum(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(collection.to_per_table()(sf), pooled)
        if name != "quantized":  # quantized rows are buffers, not parameters
            assert collection.table_parameters(0)


@pytest.mark.parametrize("name", ["batched", "per-table", "qr", "md", "quantized"])
def test_an_id_outside_its_table_is_an_index_error_naming_the_table(name):
    collection = collections()[name]
    for bad in (TABLES[2], -1):  # one past the last row of table 2 (a QR table still has a row for it), -1
        ids = [[0, 0, 0, 0], [1, 0, bad, 2]]
        with pytest.raises(IndexError, match=f"embedding index {bad} out of range for table 2 \\(9 rows\\)"):
            collection(SparseFeatures.one_hot(torch.tensor(ids)))


def test_dlrm_net_receives_a_collection_and_accepts_the_originals_keywords():
    width = interactions.interaction_width("dot", False, len(TABLES), 4, 4)
    torch.manual_seed(0)
    built = dlrm.DLRM_Net(4, TABLES, [3, 4], [width, 1], ndevices=-1, loss_function="bce", sync_dense_params=True)
    torch.manual_seed(0)
    given = dlrm.DLRM_Net(4, None, [3, 4], [width, 1], embeddings=BatchedEmbeddingBags(TABLES, 4))
    assert given.table_sizes == TABLES
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), given.state_dict().values()))
    with pytest.raises(TypeError, match="unexpected keyword argument 'devices'"):
        dlrm.DLRM_Net(4, TABLES, [3, 4], [width, 1], devices=2)
    torch.manual_seed(0)  # the original's False changed only several devices in one process: none here
    unsynced = dlrm.DLRM_Net(4, TABLES, [3, 4], [width, 1], sync_dense_params=False)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), unsynced.state_dict().values()))


class SumInteraction(interactions.Interaction):
    """x followed by the sum of the pooled embeddings (a toy interaction for the registry test)."""

    @staticmethod
    def output_width(num_tables, dense_dim, emb_dim, config):
        return dense_dim + emb_dim

    def forward(self, x, ly):
        return torch.cat([x, ly.sum(1)], dim=1)


def test_a_new_interaction_is_one_class_and_one_registry_entry(monkeypatch, run_main, capsys):
    monkeypatch.setitem(interactions.INTERACTIONS, "sum", SumInteraction)
    flags = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=4-4", "--arch-mlp-top=3-1", "--mini-batch-size=4",
             "--data-size=8"]
    code, out, err = run_main("--arch-interaction-op=sum", *flags)
    assert code == 0 and out.count("Finished training it") == 2, err
    with pytest.raises(SystemExit) as stop:
        dlrm.main(["--arch-interaction-op=cubic", *flags])
    assert stop.value.code == 2 and "'cubic' (choose from 'dot', 'cat', 'dcn', 'projection', 'sum')" in capsys.readouterr().err
