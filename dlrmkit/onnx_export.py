"""--save-onnx: export a DLRM_Net to ONNX and check the file.

The graph takes the flat sparse layout of `dlrm_data.Batch` and keeps both the batch
size and the number of lookups dynamic:

    dense_x  float32 [batch, dense features]
    offsets  int64   [tables * batch + 1]   bag starts, table-major, last = len(indices)
    indices  int64   [lookups]
    -> click probability float32 [batch, 1]

Pooling is exported as gather + scatter-add (no ONNX Loop), which needs opset >= 16.
QR, MD and weighted-pooling tables export too; quantized models do not.

    export_onnx(model, batch, "dlrm_s_pytorch.onnx")   # -> max |onnx - torch| on `batch`
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlrmkit.embeddings import BatchedEmbeddingBags, EmbeddingTableView
from dlrmkit.tricks.pooling import sum_bags

OPSET = 17
INPUT_NAMES = ["dense_x", "offsets", "indices"]


class ExportError(RuntimeError):
    pass


def require_onnx():
    """The onnx package, or an ExportError saying how to get it."""
    try:
        import onnx
    except ImportError:
        raise ExportError("--save-onnx needs the onnx package (pip install onnx; onnxruntime is optional)")
    return onnx


def table_rows(bag: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """[N, D] embedding of each index of one table, with exportable ops."""
    if isinstance(bag, nn.EmbeddingBag):
        if bag.mode != "sum":
            raise ExportError(f"ONNX export supports sum-pooled tables, not mode={bag.mode}")
        return F.embedding(indices, bag.weight)
    if isinstance(bag, EmbeddingTableView):  # a table of the batched collection: rows of its one weight
        collection = bag.collection
        return F.embedding(indices + collection.row_starts[bag.table], collection.weight)
    if hasattr(bag, "embed"):  # QR and MD tables
        return bag.embed(indices)
    raise ExportError(f"ONNX export does not support {type(bag).__name__} tables (export before quantizing)")


class ExportableDLRM(nn.Module):
    """DLRM_Net's forward on the flat layout, without data-dependent Python (traceable)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        if isinstance(model.emb_l, BatchedEmbeddingBags):
            # its state_dict holds per-table views; the tracer finds parameters through state_dict
            self.batched_weight = model.emb_l.weight

    def forward(self, dense_x, offsets, indices):
        model = self.model
        batch_size = dense_x.shape[0]
        pooled = []
        for t, bag in enumerate(model.emb_l):
            start, end = offsets[t * batch_size], offsets[(t + 1) * batch_size]
            table_indices = indices[start:end]
            weights = None
            if model.pooling_weights is not None:
                weights = model.pooling_weights.for_table(t, table_indices)
            table_offsets = offsets[t * batch_size:(t + 1) * batch_size] - start
            pooled.append(sum_bags(table_rows(bag, table_indices), table_offsets, weights))
        x = model.bot_l(dense_x)
        p = model.top_l(model.interact_features(x, torch.stack(pooled, dim=1)))
        if 0.0 < model.loss_threshold < 1.0:
            p = torch.clamp(p, min=model.loss_threshold, max=1.0 - model.loss_threshold)
        return p


def export_onnx(model: nn.Module, batch, path: str, opset: int = OPSET) -> float:
    """Writes `path` (atomically), checks it with onnx.checker and returns max |onnx - torch| on `batch`."""
    onnx = require_onnx()
    model = model.cpu().eval()
    inputs = (batch.dense_x.cpu(), batch.offsets.cpu(), batch.indices.cpu())
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notices
            warnings.simplefilter("ignore")
            torch.onnx.export(
                ExportableDLRM(model), inputs, tmp, dynamo=False, opset_version=opset,
                input_names=INPUT_NAMES, output_names=["click_probability"],
                dynamic_axes={"dense_x": {0: "batch"}, "offsets": {0: "bags_plus_one"},
                              "indices": {0: "lookups"}, "click_probability": {0: "batch"}},
            )
        onnx.checker.check_model(onnx.load(tmp), full_check=True)
        with torch.no_grad():
            expected = model(*inputs).numpy()
        difference = float(np.abs(run_onnx(tmp, inputs) - expected).max())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return difference


def run_onnx(path: str, inputs) -> np.ndarray:
    """Runs the exported graph with onnxruntime when installed, else with ONNX's reference evaluator."""
    feeds = {name: tensor.cpu().numpy() for name, tensor in zip(INPUT_NAMES, inputs)}
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(path).run(None, feeds)[0]
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]
