"""ONNX export: checker, dynamic batch and lookups, PyTorch outputs to 1e-5, CLI, missing packages."""

import sys

import numpy as np
import pytest
import torch

import dlrm_data
from dlrmkit import onnx_export
from dlrm_s_pytorch import DLRM_Net, interaction_width

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

onnx = pytest.importorskip("onnx")
TABLES = [50, 7, 300]


def make_net(dim=4, dense_out=4, **kwargs):
    torch.manual_seed(0)
    width = interaction_width("dot", False, len(TABLES), dense_out, dense_out)
    return DLRM_Net(dim, TABLES, [3, 6, dense_out], [width, 5, 1], sigmoid_top=1, **kwargs).eval()


def batches_with_other_shapes():
    """Batch sizes and lookup counts other than the export batch's, including empty bags."""
    yield dlrm_data.RandomDataset(3, TABLES, 37, 37, seed=5)[0]
    yield dlrm_data.RandomDataset(3, TABLES, 1, 1, seed=6)[0]
    empty = [np.array([0, 2, 0]), np.array([1, 0, 3]), np.array([0, 0, 0])]
    ids = [np.array([49, 3]), np.array([6, 0, 1, 1]), np.array([], dtype=np.int64)]
    yield dlrm_data.batch_from_tables(np.random.rand(3, 3), empty, ids, np.zeros(3))


@pytest.mark.parametrize("kwargs", [
    {},
    {"qr_flag": True, "qr_operation": "mult", "qr_collisions": 4, "qr_threshold": 10},
    {"qr_flag": True, "qr_operation": "concat", "qr_collisions": 4, "qr_threshold": 10, "dense_out": 8},
    {"md_flag": True, "md_threshold": 10},
    {"weighted_pooling": "learned"},
    {"loss_threshold": 0.49},
], ids=["plain", "qr-mult", "qr-concat", "md", "weighted", "clamped"])
def test_onnx_round_trip_matches_pytorch_for_any_batch(tmp_path, kwargs):
    net = make_net(**kwargs)
    if net.pooling_weights is not None:
        with torch.no_grad():
            net.pooling_weights.weight.uniform_(0.5, 1.5)
    path = tmp_path / "m.onnx"
    difference = onnx_export.export_onnx(net, dlrm_data.RandomDataset(3, TABLES, 8, 4, seed=1)[0], str(path))
    assert difference < 1e-5
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert "Loop" not in {node.op_type for node in model.graph.node}
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert shapes == {"dense_x": ["batch", 3], "offsets": ["bags_plus_one"], "indices": ["lookups"]}
    for batch in batches_with_other_shapes():
        inputs = (batch.dense_x, batch.offsets, batch.indices)
        with torch.no_grad():
            expected = net(*inputs).numpy()
        np.testing.assert_allclose(onnx_export.run_onnx(str(path), inputs), expected, rtol=0, atol=1e-5)


def test_weights_kept_apart_sit_in_one_file_beside_the_graph(tmp_path):
    """What a model over protobuf's 2 GiB gets (forced here on a small one): <file>.data, read by onnx and onnxruntime;
    nothing else left in the folder."""
    net = make_net()
    batch = dlrm_data.RandomDataset(3, TABLES, 8, 4, seed=1)[0]
    path = tmp_path / "m.onnx"
    assert onnx_export.export_onnx(net, batch, str(path), external_data=True) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").stat().st_size >= 4 * 4 * sum(TABLES)  # the tables' float32 rows
    assert path.stat().st_size < 100_000
    assert (tmp_path / "m.onnx.data").stat().st_mode & 0o777 == path.stat().st_mode & 0o777  # as the graph's
    onnx.checker.check_model(str(path), full_check=True)
    assert onnx_export.export_onnx(net, batch, str(path)) < 1e-5  # again, self-contained: the old weights go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert onnx_export.export_onnx(net, batch, str(path), external_data=True) < 1e-5
    for other in batches_with_other_shapes():
        inputs = (other.dense_x, other.offsets, other.indices)
        with torch.no_grad():
            expected = net(*inputs).numpy()
        np.testing.assert_allclose(onnx_export.run_onnx(str(path), inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.slow  # importing dynamo takes seconds
def test_a_compiled_model_exports_the_module_it_wraps(tmp_path):
    net = make_net()
    batch = dlrm_data.RandomDataset(3, TABLES, 8, 4, seed=1)[0]
    compiled = torch.compile(net)
    assert onnx_export.export_onnx(compiled, batch, str(tmp_path / "m.onnx")) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_reference_evaluator_is_used_without_onnxruntime(tmp_path, monkeypatch):
    net = make_net()
    batch = dlrm_data.RandomDataset(3, TABLES, 5, 5, seed=2)[0]
    path = str(tmp_path / "m.onnx")
    onnx_export.export_onnx(net, batch, path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now fails
    with torch.no_grad():
        expected = net(batch.dense_x, batch.offsets, batch.indices).numpy()
    out = onnx_export.run_onnx(path, (batch.dense_x, batch.offsets, batch.indices))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_save_onnx_flag_writes_the_file_after_training(run_main, tmp_path):
    path = tmp_path / "out" / "model.onnx"
    code, out, err = run_main("--mini-batch-size=4", "--data-size=8", "--save-onnx", f"--onnx-file={path}")
    assert code == 0, err
    assert path.exists() and "Saved the ONNX model to" in out and "onnx.checker passed" in out
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temporary left


def test_missing_onnx_package_is_a_clear_error_before_training(run_main, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    code, out, err = run_main("--mini-batch-size=2", "--data-size=4", "--save-onnx",
                              f"--onnx-file={tmp_path / 'm.onnx'}")
    assert code == 1 and "Finished" not in out and not (tmp_path / "m.onnx").exists()
    assert err.strip() == ("dlrm_s_pytorch.py: error: --save-onnx needs the onnx package "
                           "(pip install onnx; onnxruntime is optional)")


@pytest.mark.slow  # importing dynamo takes seconds
def test_the_trainers_compiled_dense_part_exports_as_eager(tmp_path, capsys):
    import dlrm_s_pytorch as dlrm

    net = make_net()
    dlrm.compile_dense(net, torch.device("cpu"), backend="eager")
    batch = dlrm_data.RandomDataset(3, TABLES, 8, 4, seed=1)[0]
    net(batch.dense_x, batch.sparse)  # compiled
    dlrm.save_onnx(net, batch, str(tmp_path / "m.onnx"))
    assert "Saved the ONNX model" in capsys.readouterr().out and "dense_forward" in net.__dict__  # compiled again
