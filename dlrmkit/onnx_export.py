"""--save-onnx: export a DLRM_Net to ONNX and check the file.

The graph takes the flat sparse layout of `dlrm_data.Batch` and keeps both the batch
size and the number of lookups dynamic:

    dense_x  float32 [batch, dense features]
    offsets  int64   [tables * batch + 1]   bag starts, table-major, last = len(indices)
    indices  int64   [lookups]
    -> click probability float32 [batch, 1]

The exported graph is the model's own forward, traced; pooling is exported as gather +
scatter-add (no ONNX Loop), which needs opset >= 16. QR, MD and weighted-pooling tables
export too; quantized models do not.

    export_onnx(model, batch, "dlrm_s_pytorch.onnx")   # -> max |onnx - torch| on `batch`

A model over protobuf's 2 GiB limit (the Criteo Kaggle model's tables are 2.2 GB) keeps its weights
in one file beside the graph, `<file>.data` (ONNX external data, read from there by onnx.load and
onnxruntime); a compiled model (`torch.compile`) is exported as the module it wraps.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn

from dlrmkit import outputs
from dlrmkit.sparse import SparseFeatures

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


class FlatInputs(nn.Module):
    """The model with the flat input signature (dense_x, offsets, indices) that the graph gets.

    The model's own forward is traced: its embedding collection pools with exportable ops while
    traced (`EmbeddingCollection.exportable_pool`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # parameters that the model's state_dict shows only as views (the batched collection's one
        # weight, saved as per-table rows): the tracer finds parameters through state_dict
        in_state = {id(v) for v in model.state_dict(keep_vars=True).values()}
        self.viewed_parameters = nn.ParameterList([p for p in model.parameters() if id(p) not in in_state])

    def forward(self, dense_x, offsets, indices):
        sparse = SparseFeatures(indices, offsets, dense_x.shape[0], len(self.model.table_sizes))
        return self.model(dense_x, sparse)


def export_onnx(model: nn.Module, batch, path: str, opset: int = OPSET, external_data: bool | None = None) -> float:
    """Writes `path` (and `<path>.data` for external weights) through a temporary folder beside it, checks it with
    onnx.checker and returns max |onnx - torch| on `batch`. `external_data`: keep the weights in `<path>.data`;
    None: when the graph and its weights exceed protobuf's 2 GiB (the exporter writes them apart)."""
    onnx = require_onnx()
    model = getattr(model, "_orig_mod", model).cpu().eval()  # a torch.compile wrapper: the module itself
    inputs = (batch.dense_x.cpu(), batch.offsets.cpu(), batch.indices.cpu())
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    work = tempfile.mkdtemp(dir=directory, prefix=f".{name}.export")
    with outputs.partial_output(work):
        try:
            exported = os.path.join(work, name)
            with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notices
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    FlatInputs(model), inputs, exported, dynamo=False, opset_version=opset,
                    input_names=INPUT_NAMES, output_names=["click_probability"],
                    dynamic_axes={"dense_x": {0: "batch"}, "offsets": {0: "bags_plus_one"},
                                  "indices": {0: "lookups"}, "click_probability": {0: "batch"}},
                )
            written_apart = len(os.listdir(work)) > 1  # the exporter's one file per tensor beside the graph
            data = name + ".data"
            if external_data or written_apart:  # every weight in one file named after the graph
                graph = onnx.load(exported)
                final = os.path.join(work, "graph.onnx")
                onnx.save_model(graph, final, save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                                size_threshold=0 if external_data else 1024)
                del graph
                exported = os.path.join(work, name)
                os.replace(final, exported)
            onnx.checker.check_model(exported, full_check=True)  # by path: models over 2 GiB too
            with torch.no_grad():
                expected = model(*inputs).numpy()
            difference = float(np.abs(run_onnx(exported, inputs) - expected).max())
            stale = os.path.join(directory, data)
            if not os.path.exists(os.path.join(work, data)) and os.path.exists(stale):
                os.remove(stale)  # a previous export's weights: this graph holds its own
            umask = os.umask(0)
            os.umask(umask)
            for produced in (os.path.join(work, data), exported):  # the weights first: the graph names them
                if os.path.exists(produced):
                    os.chmod(produced, 0o666 & ~umask)  # as a file written in place (ONNX writes its data 0600)
                    os.replace(produced, os.path.join(directory, os.path.basename(produced)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
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
