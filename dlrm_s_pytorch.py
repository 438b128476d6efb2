"""DLRM: the Deep Learning Recommendation Model, trained from the command line.

The flags are those of the original facebookresearch/dlrm `dlrm_s_pytorch.py`,
with the same spelling, meaning and defaults, so existing scripts run unchanged.

Usage:
    # tiny random-data run (the original's defaults)
    python dlrm_s_pytorch.py --mini-batch-size=2 --data-size=6

    # a bigger random model with Adagrad, a test every 100 iterations and a checkpoint
    python dlrm_s_pytorch.py --arch-sparse-feature-size=16 --arch-mlp-bot=13-512-256-64-16 \
        --arch-mlp-top=512-256-1 --arch-embedding-size=1000-1000-1000 \
        --data-size=100000 --mini-batch-size=128 --loss-function=bce --round-targets=True \
        --optimizer=adagrad --learning-rate=0.01 --test-freq=100 --print-time \
        --save-model=model.pt

    # resume it, or only evaluate it (optionally quantized: int8 MLPs, 4-bit embedding rows)
    python dlrm_s_pytorch.py ...same flags... --load-model=model.pt
    python dlrm_s_pytorch.py ...same flags... --load-model=model.pt --inference-only \
        --quantize-mlp-with-bit=8 --quantize-emb-with-bit=4

    # compressed tables, trace-driven ids, and every output: ONNX, graph, profile, logs
    python dlrm_s_pytorch.py --arch-embedding-size=100000-50000-100 --qr-flag --qr-collisions=4 \
        --data-generation=synthetic --data-trace-file=bench/traces/dist_emb_j.log --data-size=4096 \
        --mini-batch-size=128 --test-freq=16 --save-onnx --plot-compute-graph --enable-profiling \
        --tensor-board-filename=runs/qr --mlperf-logging --metrics-log-file=run.jsonl

    # the same run over 8 GPUs (or, without --use-gpu, 8 CPU processes); see extend_distributed.py
    torchrun --nproc_per_node=8 dlrm_s_pytorch.py --use-gpu ...same flags...

Model (`DLRM_Net`, importable without side effects):
    dense x -> bottom MLP ---------------------------\
    sparse ids -> embedding tables (sum pooling) ----> interaction (dot | cat | dcn | projection) -> top MLP -> sigmoid
    Sparse ids travel as one `dlrmkit.sparse.SparseFeatures` (flat indices + offsets); the tables are an
    embedding collection (`dlrmkit.embeddings`: by default all in one weight, one lookup; `model.emb_l[k]`
    is table k); the interactions are registered by name in `dlrmkit.interactions`.

Speed: --precision=bf16 (CPU, CUDA) or fp16 (CUDA) for the MLPs, --compile for the dense part;
bench/harness.py measures named configurations.
"""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while the libraries load: one line, as later in the run
    from dlrmkit.signals import interrupt_quietly_while_loading
    interrupt_quietly_while_loading("dlrm_s_pytorch.py")

import argparse
import configparser
import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data_utils
import dlrm_data
import extend_distributed as ext_dist
from dlrmkit import (compute_graph, flags, interactions, kernels, memory, multihot, onnx_export, outputs, profiling,
                     quantization, signals, trace_data)
from dlrmkit.embeddings import (BatchedEmbeddingBags, EmbeddingBagList, EmbeddingCollection, TableIndexError,
                                create_embedding_bag)
from dlrmkit.interactions import INTERACTIONS, InteractionConfig, interaction_class
from dlrmkit.optim import ADAGRAD_EPS, OPTIMIZERS, make_optimizer
from dlrmkit.progress import DivergenceGuard, ProgressBar, stderr_is_terminal
from dlrmkit.run_logs import MetricsLog, MLPerfLog, RunLog, RunLogError, RunLogs, TensorBoardLog
from dlrmkit.sparse import SparseFeatures
from dlrmkit.tricks import PoolingWeights, QREmbeddingBag, embedding_output_dim, md_solver, table_factory


interaction_width = interactions.interaction_width  # importable from here too, with DLRM_Net


class DLRMError(Exception):
    """A user-facing error: printed as one line, exit status 1, no traceback."""


# ============================================================================ model
BCE_EPSILON = 1e-12  # PyTorch's binary_cross_entropy divides its gradient by max(p (1 - p), this)


class _SaturationSafeSigmoid(torch.autograd.Function):
    generate_vmap_rule = True  # torch.func transforms see it as operators

    @staticmethod
    def forward(z):
        return torch.sigmoid(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        slope = (1.0 - p) * p
        return torch.where(slope < BCE_EPSILON, grad * BCE_EPSILON, torch.ops.aten.sigmoid_backward(grad, p))


class ClickProbability(nn.Sigmoid):
    """The top MLP's sigmoid, [B, 1] logits -> probabilities; the same values as `nn.Sigmoid`.

    Its gradient never vanishes where the sigmoid saturates in float32: where p (1 - p) falls below
    PyTorch's BCE epsilon (1e-12; |z| above about 27, and p rounds to exactly 1 from z = 17) it uses
    that epsilon as the slope, so that with the BCE loss on the probabilities the logits' gradient is
    p - y, as with `BCEWithLogitsLoss` (the MLPerf DLRMv2 reference's), instead of 0. Elsewhere the
    gradient is `nn.Sigmoid`'s, bit for bit. Without it one large step (Adagrad's first moves every
    weight by the learning rate) can push every prediction into saturation for good.
    """

    # float32 (or float64) logits inside which p (1 - p) stays far above BCE_EPSILON (1.4e-11 at -25; p <= 1 - 8e-7
    # at 14); narrower floats round p to 1 much earlier (bfloat16 from about 6.2)
    UNSATURATED_LOGITS = (-25.0, 14.0)

    def forward(self, z):
        if torch.is_grad_enabled() and z.requires_grad and not torch.jit.is_tracing():
            if not self.all_unsaturated(z):
                return _SaturationSafeSigmoid.apply(z)
        return torch.sigmoid(z)

    def all_unsaturated(self, z) -> bool:
        """Whether every logit of a plain eager float32 or float64 CPU tensor lies inside UNSATURATED_LOGITS,
        where nn.Sigmoid's gradient is this module's (then plain `torch.sigmoid` runs: a custom autograd function
        and its five operators cost 50-60 us per step). Elsewhere (other dtypes; CUDA: reading z would wait for
        the device; tracing, compiling, transforms) False."""
        if (z.device.type != "cpu" or z.dtype not in (torch.float32, torch.float64) or type(z) is not torch.Tensor
                or torch.compiler.is_compiling()):
            return False
        if not kernels.nothing_watches() or z.numel() == 0:
            return False
        low, high = torch.aminmax(z.detach())
        return self.UNSATURATED_LOGITS[0] < low.item() and high.item() < self.UNSATURATED_LOGITS[1]


def create_mlp(dims, sigmoid_layer: int) -> nn.Sequential:
    """Linear layers dims[0] -> dims[1] -> ...; ReLU after each, `ClickProbability` (a sigmoid) after
    layer `sigmoid_layer`.

    Weights ~ N(0, sqrt(2 / (fan_in + fan_out))), biases ~ N(0, sqrt(1 / fan_out)), as the original.
    """
    layers = []
    for i in range(len(dims) - 1):
        fan_in, fan_out = int(dims[i]), int(dims[i + 1])
        linear = nn.Linear(fan_in, fan_out, bias=True)
        with torch.no_grad():
            linear.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
            linear.bias.normal_(0.0, math.sqrt(1.0 / fan_out))
        layers.append(linear)
        layers.append(ClickProbability() if i == sigmoid_layer else nn.ReLU())
    return nn.Sequential(*layers)


def create_embeddings(table_sizes, dim, qr_flag=False, qr_operation="mult", qr_collisions=4, qr_threshold=200,
                      md_flag=False, md_threshold=200, md_temperature=0.3, md_round_dims=False,
                      per_table=False, tables=None, md_dims=None, dtype=torch.float32) -> EmbeddingCollection:
    """The embedding collection for these tables: all in one weight (BatchedEmbeddingBags), or one
    module per table (EmbeddingBagList) with QR / MD tables, or when `per_table` is asked for.

    `tables` (global table ids) builds only those, each as a single process would (model-parallel runs);
    `md_dims` gives the MD dimension of each table instead of `md_solver`'s; `dtype` the tables' storage,
    float32 or (batched tables only, else ValueError) bfloat16.
    """
    if not (qr_flag or md_flag or per_table):
        return BatchedEmbeddingBags(table_sizes, dim, tables=tables, dtype=dtype)
    if dtype != torch.float32:
        raise ValueError(f"{dtype} tables are batched tables only, not QR, MD or one module per table")
    make_bag = create_embedding_bag
    if qr_flag or md_flag:
        make_bag = table_factory(table_sizes, dim, qr_flag, qr_operation, int(qr_collisions), qr_threshold,
                                 md_flag, md_threshold, md_temperature, md_round_dims, md_dims)
    return EmbeddingBagList(table_sizes, dim, make_bag=make_bag, tables=tables,
                            out_dim=embedding_output_dim(dim, qr_flag, qr_operation))


# keywords of the original's DLRM_Net that have no counterpart here
ORIGINAL_ONLY_KEYWORDS = {
    "ndevices": "devices come from the launcher (torchrun/mpirun) and --use-gpu",
    "loss_function": "the loss is computed by the trainer (per_sample_loss), not the model",
    "sync_dense_params": "dense parameters are always kept in sync (False changed the original only for several "
                         "devices in one process, which a model here never spans)",
}


def interaction_dims_problem(interaction, dense_out: int, embedding_dim: int, sparse_dim: int,
                             qr_concat: bool = False) -> str | None:
    """Why a bottom MLP ending in `dense_out` units and pooled embeddings `sparse_dim` wide (`embedding_dim`, or
    twice it with --qr-operation=concat) cannot meet in `interaction` (an Interaction class), naming the flags
    (the original's words); None when they can."""
    problem = interaction.check_dims(dense_out, sparse_dim)
    if not problem:
        return None
    if qr_concat:
        return (f"2 arch-sparse-feature-size {sparse_dim} does not match last dim of bottom mlp {dense_out} (with "
                f"--qr-operation=concat the last dim of --arch-mlp-bot must be 2x --arch-sparse-feature-size "
                f"{embedding_dim})")
    return f"--arch-sparse-feature-size {embedding_dim} does not match last dim of bottom mlp {dense_out} " \
           f"(--arch-mlp-bot; {problem})"


def interaction_options_problem(config: InteractionConfig, embedding_dim: int, sparse_dim: int) -> str | None:
    """Why the interaction's options cannot work with pooled embeddings `sparse_dim` wide (naming the flag and,
    when --qr-operation=concat made it twice `embedding_dim`, saying so); None when they can."""
    problem = config.check_options(sparse_dim)
    if problem and sparse_dim != embedding_dim:
        problem += f" (--qr-operation=concat makes the embeddings {sparse_dim} wide: twice " \
                   f"--arch-sparse-feature-size {embedding_dim})"
    return problem


class DLRM_Net(nn.Module):
    """The DLRM model (Naumov et al. 2019, arXiv:1906.00091).

    DLRM_Net(m_spa, ln_emb, ln_bot, ln_top, arch_interaction_op="dot", ...) as in the original:
    m_spa embedding dimension (with md_flag, as the original, also a list of each table's dimension,
    projected to the largest), ln_emb rows per table, ln_bot / ln_top the full layer widths of
    the bottom and top MLPs (ln_top[0] must equal the interaction width, see
    `dlrmkit.interactions.interaction_width`). The embedding collection is built from ln_emb and the
    QR / MD keywords, or passed ready-made as `embeddings` (any `EmbeddingCollection`, e.g. a
    model-parallel one; m_spa and ln_emb then default to its dimension and table sizes, and the QR /
    MD keywords must be left out). The original's `ndevices`, `loss_function` and `sync_dense_params`
    keywords are accepted and have no effect on the model. The interaction's options: `dcn_num_layers`,
    `dcn_low_rank_dim` (arch_interaction_op="dcn") and `interaction_branch1_layer_sizes`,
    `interaction_branch2_layer_sizes` (="projection"), as `dlrmkit.interactions.InteractionConfig`.

    forward(dense_x, lS_o, lS_i=None): dense_x [B, dense features] float32 and the sparse ids as a
    `SparseFeatures` (lS_o alone), the flat layout (lS_o: [T*B+1] offsets, lS_i: [N] indices) or the
    original's per-table lists; returns the click probability [B, 1] float32.
    Raises DLRMError for layer widths that do not fit together.
    """

    def __init__(
        self,
        m_spa=None,
        ln_emb=None,
        ln_bot=None,
        ln_top=None,
        arch_interaction_op="dot",
        arch_interaction_itself=False,
        sigmoid_bot=-1,
        sigmoid_top=-1,
        loss_threshold=0.0,
        qr_flag=False,
        qr_operation="mult",
        qr_collisions=0,
        qr_threshold=200,
        md_flag=False,
        md_threshold=200,
        weighted_pooling=None,
        md_temperature=0.3,
        md_round_dims=False,
        embeddings: EmbeddingCollection | None = None,
        dcn_num_layers=interactions.DCN_NUM_LAYERS,
        dcn_low_rank_dim=interactions.DCN_LOW_RANK_DIM,
        interaction_branch1_layer_sizes=interactions.BRANCH_LAYER_SIZES,
        interaction_branch2_layer_sizes=interactions.BRANCH_LAYER_SIZES,
        **original_only,
    ):
        super().__init__()
        for name, value in original_only.items():
            if name not in ORIGINAL_ONLY_KEYWORDS:
                raise TypeError(f"DLRM_Net() got an unexpected keyword argument '{name}'")
        md_dims = None
        if isinstance(m_spa, (list, tuple)):  # the original's mixed dimensions: one per table
            if not md_flag or len(m_spa) != len(ln_emb):
                raise DLRMError(f"a list of embedding dimensions (m_spa={list(m_spa)}) needs md_flag=True and one "
                                f"dimension per table ({len(ln_emb)} tables)")
            md_dims, m_spa = [int(d) for d in m_spa], max(int(d) for d in m_spa)
        if embeddings is not None:
            if qr_flag or md_flag:
                raise DLRMError("give the tables either as `embeddings` or through the QR / MD keywords, not both")
            m_spa = embeddings.embedding_dim if m_spa is None else m_spa
            ln_emb = embeddings.table_sizes if ln_emb is None else ln_emb
        ln_emb = [int(n) for n in ln_emb]
        ln_bot = [int(n) for n in ln_bot]
        ln_top = [int(n) for n in ln_top]
        self.embedding_dim = int(m_spa)
        # width of each pooled embedding: 2 * m_spa with concatenated QR halves
        self.sparse_dim = (embeddings.embedding_dim if embeddings is not None
                           else embedding_output_dim(self.embedding_dim, qr_flag, qr_operation))
        self.table_sizes = ln_emb
        self.arch_interaction_op = arch_interaction_op
        self.arch_interaction_itself = bool(arch_interaction_itself)
        self.interaction_config = InteractionConfig(
            arch_interaction_op, self.arch_interaction_itself, dcn_num_layers, dcn_low_rank_dim,
            interaction_branch1_layer_sizes, interaction_branch2_layer_sizes)
        self.loss_threshold = float(loss_threshold)
        self._check_arch(ln_bot, ln_top, bool(qr_flag) and qr_operation == "concat")

        self.emb_l = embeddings if embeddings is not None else create_embeddings(
            ln_emb, self.embedding_dim, qr_flag, qr_operation, qr_collisions, qr_threshold, md_flag, md_threshold,
            md_temperature, md_round_dims, per_table=bool(weighted_pooling), md_dims=md_dims)
        # the original's v_W_l: per-row pooling weights, "fixed" (ones) or "learned"
        self.pooling_weights = PoolingWeights(ln_emb, learned=weighted_pooling == "learned") if weighted_pooling else None
        self.bot_l = create_mlp(ln_bot, sigmoid_bot)
        self.interaction = self.interaction_config.build(len(ln_emb), ln_bot[-1], self.sparse_dim)
        self.top_l = create_mlp(ln_top, sigmoid_top)

    def _check_arch(self, ln_bot, ln_top, qr_concat: bool):
        """The one check that the bottom MLP, the tables, the interaction and the top MLP fit together."""
        dense_out = ln_bot[-1]
        try:
            interaction = interaction_class(self.arch_interaction_op)
        except ValueError as e:
            raise DLRMError(str(e))
        problem = (interaction_dims_problem(interaction, dense_out, self.embedding_dim, self.sparse_dim, qr_concat)
                   or interaction_options_problem(self.interaction_config, self.embedding_dim, self.sparse_dim))
        if problem:
            raise DLRMError(problem)
        width = self.interaction_config.output_width(len(self.table_sizes), dense_out, self.sparse_dim)
        if ln_top[0] != width:
            raise DLRMError(f"# of feature interactions {width} does not match first dim of top mlp {ln_top[0]}")

    def sparse_features(self, dense_x, lS_o, lS_i=None) -> SparseFeatures:
        """The forward's sparse input as SparseFeatures, whichever layout it came in."""
        if isinstance(lS_o, SparseFeatures):
            return lS_o
        batch_size = dense_x.shape[0]
        if isinstance(lS_o, torch.Tensor) and lS_o.dim() == 1 and isinstance(lS_i, torch.Tensor) and lS_i.dim() == 1:
            return SparseFeatures(lS_i, lS_o, batch_size, len(self.table_sizes))
        return SparseFeatures.from_original(lS_o, lS_i, batch_size)

    def apply_emb(self, sparse: SparseFeatures) -> torch.Tensor:
        """Pooled embeddings [B, T, D] (with --weighted-pooling, each id's row weighted)."""
        if self.pooling_weights is not None:
            sparse = sparse.with_weights(self.pooling_weights(sparse))
        return self.emb_l(sparse)

    def interact_features(self, x, ly, autocast_layer=False):
        """x: [B, D] bottom-MLP output; ly: [B, T, D] pooled embeddings (or the original's list of T
        [B, D] tensors) -> [B, ln_top[0]], float32 under autocast too; but with `autocast_layer` (the output
        goes straight into a layer running under autocast, which casts it to the autocast dtype) it may come
        in that dtype already, with the values the cast would give (`Interaction.top_input`: the dot
        interaction's native kernels under CPU bf16 autocast)."""
        if isinstance(ly, (list, tuple)):
            ly = torch.stack(list(ly), dim=1)
        return self.interaction.top_input(x, ly, autocast_layer)

    def apply_mlp(self, x, layers):
        """The original's helper: `layers` (bot_l or top_l) applied to x."""
        return layers(x)

    def sequential_forward(self, dense_x, lS_o, lS_i=None):
        """The original's name for the single-device forward."""
        return self.forward(dense_x, lS_o, lS_i)

    def forward(self, dense_x, lS_o, lS_i=None):
        ly = self.apply_emb(self.sparse_features(dense_x, lS_o, lS_i))
        return self.dense_forward(dense_x, ly)

    def dense_forward(self, dense_x, ly):
        """Bottom MLP, interaction and top MLP: everything after the lookups (what --compile compiles)."""
        x = self.bot_l(dense_x)
        z = self.interact_features(x, ly, autocast_layer=isinstance(self.top_l[0], nn.Linear))
        for layer in self.top_l:
            if isinstance(layer, nn.Sigmoid):
                z = z.float()  # the probabilities (and so the loss) in float32 under autocast too
            z = layer(z)
        if 0.0 < self.loss_threshold < 1.0:
            z = torch.clamp(z, min=self.loss_threshold, max=1.0 - self.loss_threshold)
        return z


# ============================================================================ precision and speed
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device):
    if precision == "fp16" and device.type != "cuda":
        raise DLRMError("--precision=fp16 needs CUDA (--use-gpu on a machine with a GPU); "
                        "on the CPU use --precision=bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DLRMError(f"--precision=bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16")


def autocast(precision: str, device: torch.device):
    """The forward's autocast context: none for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compile_dense(model: DLRM_Net, device: torch.device, backend: str = "inductor"):
    """torch.compile the dense part; the lookups stay eager (their sparse gradients do not compile)."""
    if not hasattr(torch, "compile"):
        raise DLRMError(f"--compile needs torch >= 2.0 (this is {torch.__version__})")
    if backend == "inductor" and device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise DLRMError("--compile on the CPU needs a C++ compiler (g++) on the PATH")
    if backend == "inductor" and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise DLRMError("--compile on CUDA needs the triton package (pip install triton)")
    # an instance attribute: the state_dict keys stay those of the original
    model.dense_forward = torch.compile(model.dense_forward, backend=backend)


@contextlib.contextmanager
def eager_dense(model: DLRM_Net):
    """Inside, the model's own (uncompiled) dense part: what tracing for ONNX needs."""
    compiled = model.__dict__.pop("dense_forward", None)
    try:
        yield model
    finally:
        if compiled is not None:
            model.dense_forward = compiled


def keep_freed_memory() -> bool:
    """Stops glibc returning big freed blocks to the OS; True when it applied.

    Every iteration allocates and frees hundreds of MiB (lookups, sparse gradients, updates).
    By default glibc gives blocks over 32 MiB back at once, and the next iteration pays a page
    fault per 4 KiB to get them again, zeroed: a third of an iteration of the benchmark model.
    The effect of MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647; a no-op off glibc.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def device_batches(loader, device: torch.device):
    """The loader's batches on `device`. On CUDA the (pinned) next batch is copied on a side
    stream while the current one computes, so no iteration waits for its inputs."""
    if device.type == "cpu":  # the loaders' batches are there already
        yield from loader
        return
    if device.type != "cuda":
        yield from (batch.to(device) for batch in loader)
        return
    copy_stream = torch.cuda.Stream(device)

    def copy(batch):
        if batch is None:
            return None
        with torch.cuda.stream(copy_stream):
            return batch.to(device, non_blocking=True)

    batches = iter(loader)
    upcoming = copy(next(batches, None))
    while upcoming is not None:
        compute_stream = torch.cuda.current_stream(device)
        compute_stream.wait_stream(copy_stream)
        batch = upcoming
        batch.record_stream(compute_stream)  # memory reused only after its use here
        upcoming = copy(next(batches, None))
        yield batch


# ============================================================================ configuration
EXAMPLES = """examples:
  # random data (no signal to learn: a speed check): a small model, 100 batches, a test every 50
  {command} --arch-embedding-size=1000-1000-1000 --data-size=12800 --mini-batch-size=128 \\
      --loss-function=bce --round-targets=True --learning-rate=0.1 --test-freq=50
  # Criteo Kaggle (train.txt from the Display Advertising Challenge), the original's model
  {command} --data-generation=dataset --data-set=kaggle --raw-data-file=./input/train.txt \\
      --processed-data-file=./input/kaggleAdDisplayChallenge_processed.npz --arch-sparse-feature-size=16 \\
      --arch-mlp-bot=13-512-256-64-16 --arch-mlp-top=512-256-1 --loss-function=bce \\
      --learning-rate=0.1 --mini-batch-size=128 --print-freq=1024 --test-freq=102400 --test-mini-batch-size=16384
"""


def package_version() -> str:
    """This program's version: setup.cfg's in a source checkout, else the installed package's metadata."""
    setup_cfg = os.path.join(os.path.dirname(os.path.abspath(__file__)), "setup.cfg")
    config = configparser.ConfigParser()
    if config.read(setup_cfg) and config.has_option("metadata", "version"):
        return config.get("metadata", "version")
    try:
        return importlib.metadata.version("dlrm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The trainer's flags: the original's (spelling, meaning, defaults), each number with its valid range."""
    prog = prog or flags.program_name("dlrm_s_pytorch.py")
    parser = flags.CommandLineParser(
        prog=prog, foreign_flags=flags.TORCHREC_FLAGS, foreign_program="torchrec_dlrm/dlrm_main.py",
        established_flags=flags.ORIGINAL_FLAGS,
        description="Train the Deep Learning Recommendation Model (DLRM)",
        epilog=EXAMPLES.format(command=prog if prog.startswith("dlrm") and not prog.endswith(".py") else f"python {prog}"),
    )
    flag, number = flags.add_bool_flag, flags.add_number
    at_least, between = flags.at_least, flags.between

    g = parser.add_argument_group("model")
    number(g, "--arch-sparse-feature-size", int, 2, at_least(1), "embedding dimension")
    number(g, "--arch-embedding-size", flags.dash_separated(int), "4-3-2", at_least(1),
           "rows of each embedding table (random data); derived from the data set otherwise")
    number(g, "--arch-mlp-bot", flags.dash_separated(int), "4-3-2", at_least(1),
           "bottom MLP widths, input (dense features) first")
    number(g, "--arch-mlp-top", flags.dash_separated(int), "4-2-1", at_least(1),
           "top MLP widths after its input; the interaction width is prepended")
    g.add_argument("--arch-interaction-op", type=str, default="dot", choices=list(INTERACTIONS),
                   help="feature interaction: dot products (DLRM), concatenation, the DCN V2 cross network "
                        "(DLRM-DCNv2, the MLPerf model) or the projection of TorchRec's DLRM_Projection")
    flag(g, "--arch-interaction-itself", False, "dot interaction includes each feature with itself")
    number(g, "--dcn-num-layers", int, interactions.DCN_NUM_LAYERS, at_least(1),
           "dcn: cross layers (at least 1; without any the interaction is --arch-interaction-op=cat)")
    number(g, "--dcn-low-rank-dim", int, interactions.DCN_LOW_RANK_DIM, at_least(1),
           "dcn: rank r of each cross layer's matrix U V (U: N x r, V: r x N)")
    number(g, "--interaction-branch1-layer-sizes", flags.dash_separated(int),
           "-".join(map(str, interactions.BRANCH_LAYER_SIZES)), at_least(1),
           "projection: widths of the first branch MLP after its input; the last a multiple F1 x "
           "--arch-sparse-feature-size")
    number(g, "--interaction-branch2-layer-sizes", flags.dash_separated(int),
           "-".join(map(str, interactions.BRANCH_LAYER_SIZES)), at_least(1),
           "projection: widths of the second branch MLP after its input; the last a multiple F2 x "
           "--arch-sparse-feature-size (the top MLP reads the bottom MLP's output and F1 x F2 products)")
    g.add_argument("--weighted-pooling", type=str, default=None, choices=["fixed", "learned"],
                   help="per-index weights in the embedding pooling")
    g.add_argument("--activation-function", type=str, default="relu", help="MLP activation (relu)")

    g = parser.add_argument_group("embedding compression")
    flag(g, "--md-flag", False, "mixed-dimension embeddings")
    number(g, "--md-threshold", int, 200, at_least(0), "tables with more rows get mixed dimensions")
    number(g, "--md-temperature", float, 0.3, at_least(0), "mixed-dimension temperature (alpha)")
    flag(g, "--md-round-dims", False, "round mixed dimensions to the nearest power of 2")
    flag(g, "--qr-flag", False, "quotient-remainder embeddings")
    number(g, "--qr-threshold", int, 200, at_least(0), "tables with more rows get QR embeddings")
    g.add_argument("--qr-operation", type=str, default="mult", choices=["mult", "add", "concat"],
                   help="how quotient and remainder embeddings combine")
    number(g, "--qr-collisions", int, 4, at_least(1), "QR collisions (rows per quotient bucket)")

    g = parser.add_argument_group("loss")
    g.add_argument("--loss-function", type=str, default="mse", choices=["mse", "bce", "wbce"], help="loss")
    number(g, "--loss-weights", flags.dash_separated(float), "1.0-1.0", at_least(0),
           "wbce weights of negatives-positives (a sample's class: its target truncated, as the original: "
           "below 1 a negative)")
    # from 0.5 on the clamp [t, 1-t] would be empty: every prediction the same
    number(g, "--loss-threshold", float, 0.0, between(0, 0.5, open_high=True),
           "clamp predictions to [t, 1-t] when t > 0")
    flag(g, "--round-targets", False, "round random targets to 0/1")

    g = parser.add_argument_group("data")
    g.add_argument("--data-generation", type=str, default="random", choices=["random", "synthetic", "dataset"],
                   help="random data, synthetic trace-driven data, or a Criteo data set")
    number(g, "--data-size", int, 1, at_least(1),
           "random or synthetic data: samples of the test set, and of the training set without --num-batches")
    number(g, "--num-batches", int, 0, at_least(0), "training batches per epoch (0: all)")
    number(g, "--num-indices-per-lookup", int, 10, at_least(0), "random data: (max) ids per bag (0: one, or none with --num-indices-per-lookup-fixed)")
    flag(g, "--num-indices-per-lookup-fixed", False, "random data: every bag has exactly that many ids")
    g.add_argument("--rand-data-dist", type=str, default="uniform", choices=list(dlrm_data.RANDOM_DISTRIBUTIONS),
                   help="random data: distribution of the sparse ids")
    number(g, "--rand-data-min", float, 0, flags.Range(), "gaussian ids: lowest id")
    number(g, "--rand-data-max", float, 1, flags.Range(), "gaussian ids: highest id")
    number(g, "--rand-data-mu", float, -1, flags.Range(), "gaussian ids: mean (-1: midpoint of min and max)")
    number(g, "--rand-data-sigma", float, 1, at_least(0), "gaussian ids: standard deviation")
    g.add_argument("--data-trace-file", type=str, default="./input/dist_emb_j.log",
                   help="synthetic data: trace file, j replaced by the table number")
    flag(g, "--data-trace-enable-padding", False, "synthetic data: pad short traces")
    flags.add_data_flags(g, list(data_utils.DAYS))
    flags.add_multi_hot_flags(g)
    g.add_argument("--data-randomize", type=str, default="total", choices=["total", "day", "none"],
                   help="shuffling of the training rows, redrawn each epoch")
    number(g, "--num-workers", int, 0, at_least(0),
           "data loader worker processes (at most the CPUs this process may use)")
    flag(g, "--memory-map", False, "memory-map the processed data instead of loading it")
    flag(g, "--mlperf-bin-shuffle", False, "shuffle batches of the binary loader")

    g = parser.add_argument_group("training")
    number(g, "--mini-batch-size", int, 1, at_least(1), "training mini-batch size")
    number(g, "--nepochs", int, 1, at_least(1), "training epochs")
    number(g, "--learning-rate", float, 0.01, at_least(0), "learning rate")
    g.add_argument("--optimizer", type=str, default="sgd", choices=list(OPTIMIZERS), help="optimizer")
    number(g, "--adagrad-eps", float, ADAGRAD_EPS, flags.positive(),
           "Adagrad's epsilon, added to the root of the squared-gradient sums (the MLPerf DLRMv2 reference: 1e-8)")
    number(g, "--numpy-rand-seed", int, 123, between(0, 2**32 - 1), "seed of all random numbers")  # NumPy's range
    number(g, "--mlperf-grad-accum-iter", int, 1, at_least(1), "micro-batches accumulated per optimizer step")
    number(g, "--lr-num-warmup-steps", int, 0, at_least(0), "linear LR warmup steps")
    number(g, "--lr-decay-start-step", int, 0, at_least(0), "step where polynomial LR decay starts")
    number(g, "--lr-num-decay-steps", int, 0, at_least(0), "steps of polynomial LR decay (0: none)")
    flag(g, "--sync-dense-params", True, "keep dense parameters in sync across devices")
    flag(g, "--inference-only", False, "no training: evaluates the test set once (the loaded model with --load-model)")
    g.add_argument("--precision", type=str, default="fp32", choices=list(PRECISIONS),
                   help="MLP arithmetic through autocast: bf16 (CPU, CUDA) or fp16 (CUDA, with loss scaling), also "
                        "the matrix products of the dcn and projection interactions; embeddings, the dot products, "
                        "optimizer state and the loss stay float32")
    g.add_argument("--embedding-precision", type=str, default="fp32", choices=["fp32", "bf16"],
                   help="how the embedding tables are stored: bf16 halves their memory and memory traffic (CPU, "
                        "SGD; each update rounded stochastically; needs a C compiler for the native kernels)")
    flag(g, "--compile", False, "torch.compile the dense part (bottom MLP, interaction, top MLP)")

    g = parser.add_argument_group("evaluation")
    number(g, "--test-freq", int, -1, at_least(1, -1, 0), "test every N iterations and at epoch end (-1, 0: never)")
    number(g, "--test-mini-batch-size", int, -1, at_least(1, -1), "test batch size (-1: training's)")
    number(g, "--test-num-workers", int, -1, at_least(0, -1), "test loader workers (-1: training's)")
    number(g, "--mlperf-acc-threshold", float, 0.0, between(0, 1), "stop once test accuracy reaches it (0: never)")
    number(g, "--mlperf-auc-threshold", float, 0.0, between(0, 1), "stop once test AUC reaches it (0: never)")

    g = parser.add_argument_group("output")
    number(g, "--print-freq", int, 1, at_least(1), "print every N iterations")
    # float64 has 17 significant digits
    number(g, "--print-precision", int, 5, between(0, 17), "digits of printed arrays")
    flag(g, "--print-time", False, "print ms per iteration")
    flag(g, "--print-wall-time", False, "append the wall-clock time to progress lines")
    flag(g, "--debug-mode", False, "print the architecture, the data and the parameters")
    flag(g, "--enable-profiling", False, "run the PyTorch profiler: top operators and a Chrome trace")
    g.add_argument("--profiling-trace-file", type=str, default="",
                   help="Chrome trace written by --enable-profiling, operator tables next to it "
                        "(default: the original's dlrm_s_pytorch<timestamp>.json, _shape.prof, _total.prof)")
    flag(g, "--plot-compute-graph", False, "write the autograd graph as Graphviz source (and PDF when dot exists)")
    g.add_argument("--compute-graph-file", type=str, default="dlrm_s_pytorch_graph.dot",
                   help="Graphviz source written by --plot-compute-graph (the PDF goes next to it)")
    g.add_argument("--tensor-board-filename", type=str, default=None,
                   help="write TensorBoard scalars to this directory (the original always wrote run_kaggle_pt)")
    g.add_argument("--metrics-log-file", type=str, default=None,
                   help="write a JSON line per progress print and per test (plot it with tools/plot_metrics.py)")
    flag(g, "--mlperf-logging", False, "MLPerf-format log lines (:::MLLOG) on stdout")

    g = parser.add_argument_group("checkpoints and export")
    g.add_argument("--save-model", type=str, default="", help="write a checkpoint here whenever test AUC improves")
    g.add_argument("--load-model", type=str, default="", help="resume (or with --inference-only, evaluate) this checkpoint")
    flag(g, "--save-onnx", False, "export the trained model to ONNX (dynamic batch and lookups)")
    g.add_argument("--onnx-file", type=str, default="dlrm_s_pytorch.onnx", help="file written by --save-onnx")
    number(g, "--quantize-mlp-with-bit", int, 32, flags.one_of(8, 16, 32),
           "--inference-only on CPU: MLP weights in 8 (int8) or 16 (fp16) bits, 32: unquantized")
    number(g, "--quantize-emb-with-bit", int, 32, flags.one_of(4, 8, 32),
           "--inference-only on CPU: embedding rows in 4 or 8 bits, 32: unquantized")

    g = parser.add_argument_group("devices and distribution")
    flag(g, "--use-gpu", False, "train on CUDA")
    number(g, "--local_rank", int, -1, at_least(0, -1), "local rank given by the launcher",
           dest="local_rank", aliases=("--local-rank",))
    g.add_argument("--dist-backend", type=str, default="",
                   help="torch.distributed backend (gloo, nccl, mpi; default nccl with --use-gpu, else gloo)")
    # a year at most: longer ones overflow the process group's timers
    number(g, "--dist-timeout", float, 600, flags.Range(low=0, open_low=True, high=365 * 24 * 3600),
           "seconds a distributed run waits for a silent process before stopping with an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


ADAGRADS = ("adagrad", "rwsadagrad")  # the optimizers with an epsilon (--adagrad-eps)

# flags whose default (-1) means "the value of this other flag"
DERIVED_DEFAULTS = {"test_mini_batch_size": "mini_batch_size", "test_num_workers": "num_workers"}


def data_from(*sources: str) -> flags.Condition:
    """The data source is one of `sources` (--data-generation)."""
    def unless(args):
        if len(sources) == 1:
            return f"without --data-generation={sources[0]}"
        return f"with --data-generation={args.data_generation}"

    return flags.Condition(f"data from {' or '.join(sources)}", lambda args, distributed: args.data_generation in sources,
                           f"--data-generation={' or '.join(sources)}", unless)


def flag_is(name: str, value=True) -> flags.Condition:
    """Flag `name` is `value` (True: given)."""
    dest = name[2:].replace("-", "_")
    needs = name if value is True else f"{name}={value}"
    unless = f"with {name}" if value is False else f"without {needs}"
    return flags.Condition(needs, lambda args, distributed: getattr(args, dest) == value, needs, lambda args: unless)


def testing(args) -> bool:
    """A test runs: --test-freq, or --inference-only (one test at the end)."""
    return args.inference_only or args.test_freq > 0


ADAGRAD = flags.Condition("adagrad", lambda args, distributed: args.optimizer in ADAGRADS,
                          "--optimizer=adagrad or rwsadagrad", lambda args: f"with --optimizer={args.optimizer}")
TRAINING = flags.Condition("training", lambda args, distributed: not args.inference_only,
                           "training (no --inference-only)", lambda args: "with --inference-only")
TESTING = flags.Condition("testing", lambda args, distributed: testing(args),
                          "--test-freq or --inference-only", lambda args: "without --test-freq (no test runs)")


def data_size_sizes_something(args, distributed) -> bool:
    """--data-size sizes the test set, and the training set without --num-batches; with it, the test
    set has as many samples as the training set when that is larger."""
    return args.num_batches <= 0 or args.data_size > args.num_batches * args.mini_batch_size


def data_size_unless(args) -> str:
    samples = args.num_batches * args.mini_batch_size
    return (f"with --num-batches={args.num_batches}: the training and test sets have --num-batches x "
            f"--mini-batch-size = {samples} samples, at least --data-size")


SIZED_BY_DATA_SIZE = flags.Condition(
    "sized by --data-size", data_size_sizes_something, "no --num-batches, or more samples than it gives",
    data_size_unless)
DECAYING = flags.Condition("decaying", lambda args, distributed: args.lr_num_decay_steps > 0, "--lr-num-decay-steps",
                           lambda args: "without --lr-num-decay-steps (no decay)")
DISTRIBUTED = flags.Condition("distributed", lambda args, distributed: distributed, "a launcher",
                              lambda args: "in a single process (launch with torchrun or mpirun)")
DATASET = data_from("dataset")
RANDOM_OR_SYNTHETIC = data_from("random", "synthetic")
GAUSSIAN_IDS = (data_from("random"), flag_is("--rand-data-dist", "gaussian"))
MULTI_HOT = flags.Condition("multi-hot", lambda args, distributed: bool(args.multi_hot_sizes), "--multi-hot-sizes",
                            lambda args: "without --multi-hot-sizes")
ONE_HOT_OR_BAGS = flags.Condition(
    "generated bags", lambda args, distributed: not args.multi_hot_sizes, "no --multi-hot-sizes",
    lambda args: "with --multi-hot-sizes (one id per table and sample, expanded into its multi-hot bag)")
# .bin files are always memory-mapped; --memory-map still chooses the original's --memory-map files when there
MEMORY_MAP_CHOOSES = flags.Condition(
    "memory-map", lambda args, distributed: not args.mlperf_bin_loader or data_utils.original_reordered_files(
        args.raw_data_file, args.data_set) is not None, "no --mlperf-bin-loader",
    lambda args: "with --mlperf-bin-loader")

# Which flags have an effect, by data source, mode and other flags: each flag, and the conditions
# that must all hold for it to change anything. A flag set otherwise gets a note (or an error,
# REFUSED_WITHOUT_EFFECT); flags not listed always have an effect.
APPLIES_WHEN = {
    "--arch-embedding-size": (RANDOM_OR_SYNTHETIC,),  # a data set's sizes come from its data
    "--data-size": (RANDOM_OR_SYNTHETIC, SIZED_BY_DATA_SIZE),
    "--num-indices-per-lookup": (RANDOM_OR_SYNTHETIC, ONE_HOT_OR_BAGS),
    "--num-indices-per-lookup-fixed": (RANDOM_OR_SYNTHETIC, ONE_HOT_OR_BAGS),
    "--multi-hot-distribution-type": (MULTI_HOT,),
    "--round-targets": (RANDOM_OR_SYNTHETIC,),
    "--rand-data-dist": (data_from("random"),),
    "--rand-data-min": GAUSSIAN_IDS,
    "--rand-data-max": GAUSSIAN_IDS,
    "--rand-data-mu": GAUSSIAN_IDS,
    "--rand-data-sigma": GAUSSIAN_IDS,
    "--data-trace-file": (data_from("synthetic"),),
    "--data-trace-enable-padding": (data_from("synthetic"),),
    "--data-set": (DATASET,),
    "--raw-data-file": (DATASET,),
    "--processed-data-file": (DATASET,),
    "--data-randomize": (DATASET,),
    "--max-ind-range": (DATASET,),
    "--data-sub-sample-rate": (DATASET,),
    "--dataset-multiprocessing": (DATASET,),
    "--mlperf-bin-loader": (DATASET,),
    "--memory-map": (DATASET, MEMORY_MAP_CHOOSES),
    "--mlperf-bin-shuffle": (DATASET, flag_is("--mlperf-bin-loader")),
    "--learning-rate": (TRAINING,),
    "--optimizer": (TRAINING,),
    "--adagrad-eps": (TRAINING, ADAGRAD),
    "--mlperf-grad-accum-iter": (TRAINING,),
    "--lr-num-warmup-steps": (TRAINING,),
    "--lr-decay-start-step": (TRAINING, DECAYING),
    "--lr-num-decay-steps": (TRAINING,),
    "--test-freq": (TRAINING,),  # --inference-only tests once
    "--nepochs": (TRAINING,),
    "--print-freq": (TRAINING,),
    "--test-mini-batch-size": (TESTING,),
    "--test-num-workers": (TESTING,),
    "--mlperf-acc-threshold": (TRAINING, TESTING),  # stops training
    "--mlperf-auc-threshold": (TRAINING, TESTING),
    "--dist-backend": (DISTRIBUTED,),
    "--dist-timeout": (DISTRIBUTED,),
    "--local_rank": (DISTRIBUTED,),
    "--md-threshold": (flag_is("--md-flag"),),
    "--md-temperature": (flag_is("--md-flag"),),
    "--md-round-dims": (flag_is("--md-flag"),),
    "--qr-threshold": (flag_is("--qr-flag"),),
    "--qr-operation": (flag_is("--qr-flag"),),
    "--qr-collisions": (flag_is("--qr-flag"),),
    "--loss-weights": (flag_is("--loss-function", "wbce"),),
    "--arch-interaction-itself": (flag_is("--arch-interaction-op", "dot"),),
    "--precision": (flags.Condition("--quantize-mlp-with-bit=32", lambda args, distributed: args.quantize_mlp_with_bit
                                    == 32, "--quantize-mlp-with-bit=32", lambda args: "with --quantize-mlp-with-bit="
                                    f"{args.quantize_mlp_with_bit} (the quantized MLPs compute as quantized)"),),
    "--dcn-num-layers": (flag_is("--arch-interaction-op", "dcn"),),
    "--dcn-low-rank-dim": (flag_is("--arch-interaction-op", "dcn"),),
    "--interaction-branch1-layer-sizes": (flag_is("--arch-interaction-op", "projection"),),
    "--interaction-branch2-layer-sizes": (flag_is("--arch-interaction-op", "projection"),),
    "--onnx-file": (flag_is("--save-onnx"),),
    "--profiling-trace-file": (flag_is("--enable-profiling"),),
    "--compute-graph-file": (flag_is("--plot-compute-graph"),),
}
REFUSED_WITHOUT_EFFECT = ("--raw-data-file", "--processed-data-file")  # data files: a forgotten --data-generation


def check_writable(flag: str, path: str, example: str = "model.pt"):
    """Stops before any work when an output file cannot be written: tried by creating (and removing) a
    file in its folder, which is created if missing; `example`: a file name to suggest when `path` is a
    directory."""
    try:
        outputs.check_output(flag, path, example)
    except outputs.OutputError as e:
        raise DLRMError(str(e))


def check_readable(flag: str, path: str, expected: str):
    """Stops before any work when an input file is missing or is a directory; `expected` says what it should be."""
    if os.path.isdir(path):
        raise DLRMError(f"{flag} {path}: is a directory; expected {expected}")
    if not os.path.exists(path):
        raise DLRMError(f"{flag} {path}: no such file (expected {expected})")


def validate_args(args, distributed: bool | None = None) -> list[str]:
    """Stops (DLRMError) on flags that cannot work; returns notes for flags that have no effect here.

    `distributed`: launched by torchrun/mpirun (default: read from the environment)."""
    parser = build_parser()
    if distributed is None:
        distributed = ext_dist.launch_info() is not None
    ineffective = flags.ineffective_flags(parser, args, APPLIES_WHEN, distributed, DERIVED_DEFAULTS)
    # with --inference-only the training flags are unused whatever their values (--nepochs=0): noted, not checked
    unused = [name for name, condition in ineffective if condition is TRAINING]
    problem = flags.check_ranges(parser, args, unused)
    if problem:
        raise DLRMError(problem)
    for name, condition in ineffective:
        if name in REFUSED_WITHOUT_EFFECT:
            raise DLRMError(f"{name} needs {condition.needs} (it is {args.data_generation})")
    dataset = args.data_generation == "dataset"
    if dataset and not (args.raw_data_file or args.processed_data_file):
        raise DLRMError("--data-generation=dataset needs --raw-data-file (or an existing --processed-data-file)")
    if args.activation_function != "relu":
        raise DLRMError(f"--activation-function={args.activation_function} is not supported (relu)")
    if args.arch_mlp_top[-1] != 1:
        raise DLRMError(f"--arch-mlp-top must end in 1 (the click probability), got {args.arch_mlp_top[-1]}")
    if args.multi_hot_sizes:  # the data's table count: the flags' for generated data, Criteo's 26
        try:
            multihot.sizes_per_table(args.multi_hot_sizes, data_utils.NUM_SPARSE if dataset else
                                     len(args.arch_embedding_size))
        except ValueError as e:
            raise DLRMError(str(e))
    if dataset and args.processed_data_file:  # a materialized multi-hot set: the flags must agree with it
        out_dir = data_utils.processed_dir(args.processed_data_file, args.raw_data_file, args.data_set)
        if data_utils.unfinished_multi_hot(out_dir):
            raise DLRMError(f"--processed-data-file {out_dir}: an unfinished multi-hot set (its python data_utils.py "
                            "multi-hot was interrupted); rerun that command to finish it")
        metadata = data_utils.read_multi_hot_metadata(out_dir)
        if metadata is not None:
            try:
                dlrm_data.check_multi_hot_flags(args, out_dir, metadata)
            except data_utils.DataError as e:
                raise DLRMError(str(e))
    # the model's shape, from the flags alone: before any data is read or prepared
    interaction = InteractionConfig.from_args(args)
    try:
        interaction_kind = interaction.interaction_class
    except ValueError as e:
        raise DLRMError(str(e))
    sparse_dim = embedding_output_dim(args.arch_sparse_feature_size, args.qr_flag, args.qr_operation)
    problem = (interaction_dims_problem(interaction_kind, args.arch_mlp_bot[-1], args.arch_sparse_feature_size,
                                        sparse_dim, args.qr_flag and args.qr_operation == "concat")
               or interaction_options_problem(interaction, args.arch_sparse_feature_size, sparse_dim))
    if problem:
        raise DLRMError(problem)
    if dataset and args.arch_mlp_bot[0] != data_utils.NUM_DENSE:
        raise DLRMError(dense_features_problem(data_utils.NUM_DENSE, args.arch_mlp_bot[0]))
    if args.data_generation == "random" and args.rand_data_dist == "gaussian":
        if args.rand_data_min > args.rand_data_max:
            raise DLRMError(f"--rand-data-min {args.rand_data_min:g} is above --rand-data-max {args.rand_data_max:g}")
        problem = gaussian_ids_problem(args.rand_data_min, args.rand_data_max, min(args.arch_embedding_size))
        if problem:
            raise DLRMError(problem)
    for flag, path, wanted, example in (
            ("--save-model", args.save_model, bool(args.save_model), "model.pt"),
            ("--onnx-file", args.onnx_file, args.save_onnx, "model.onnx"),
            ("--profiling-trace-file", args.profiling_trace_file, args.enable_profiling and args.profiling_trace_file,
             "trace.json"),  # the name as given, before a distributed run's rank is added to it
            *[("--profiling-trace-file", file, args.enable_profiling, "trace.json")
              for file in profiling.output_paths(args.profiling_trace_file, rank=profiling_rank()).values()],
            ("--compute-graph-file", args.compute_graph_file, args.plot_compute_graph, "graph.dot"),
            ("--metrics-log-file", args.metrics_log_file, bool(args.metrics_log_file), "metrics.jsonl")):
        if wanted:
            check_writable(flag, path, example)
    if args.tensor_board_filename and os.path.isfile(args.tensor_board_filename):
        raise DLRMError(f"--tensor-board-filename {args.tensor_board_filename}: is a file; TensorBoard writes a "
                        "directory of event files there (give a directory name)")
    if args.tensor_board_filename:
        problem = outputs.output_problem(os.path.join(args.tensor_board_filename, "events.out.tfevents"))
        if problem:
            raise DLRMError(f"--tensor-board-filename {args.tensor_board_filename}: {problem}")
    launch = ext_dist.launch_info()
    if args.load_model and (launch is None or launch.rank == 0):  # rank 0 reads it for all
        check_readable("--load-model", args.load_model, "a checkpoint file written by --save-model")
    if args.data_generation == "synthetic":
        if os.path.isdir(args.data_trace_file):
            raise DLRMError(f"--data-trace-file {args.data_trace_file}: is a directory; expected a trace "
                            f"distribution file name with j for the table number (e.g. "
                            f"{os.path.join(args.data_trace_file, 'dist_emb_j.log')})")
    world = ext_dist.launch_world_size()
    for name in ("mini_batch_size", "test_mini_batch_size"):
        if getattr(args, name) % world:
            raise DLRMError(f"--{name.replace('_', '-')} {getattr(args, name)} is not divisible by the {world} "
                            "processes of this run (each takes an equal share of the global batch)")
    if world > 1:
        single_process_only = {"--precision=fp16": args.precision == "fp16",
                               "--save-onnx": args.save_onnx, "--plot-compute-graph": args.plot_compute_graph,
                               "--weighted-pooling": args.weighted_pooling is not None,
                               "--quantize-mlp-with-bit": args.quantize_mlp_with_bit != 32,
                               "--quantize-emb-with-bit": args.quantize_emb_with_bit != 32}
        for name, given in single_process_only.items():
            if given:
                raise DLRMError(f"not supported yet: {name} in a distributed run (run it in a single process, "
                                "e.g. on a checkpoint of this run)")
    if args.loss_function == "wbce" and len(args.loss_weights) != 2:
        raise DLRMError(f"--loss-weights needs two values (negative-positive), got {len(args.loss_weights)}")
    if args.loss_function == "wbce" and max(args.loss_weights) == 0:
        raise DLRMError("--loss-weights: at least one weight must be positive (with both 0 the loss is 0: "
                        "nothing is learned)")
    if args.lr_num_decay_steps > 0 and args.lr_decay_start_step < args.lr_num_warmup_steps:
        raise DLRMError(
            f"--lr-decay-start-step {args.lr_decay_start_step} is before the end of warmup "
            f"(--lr-num-warmup-steps {args.lr_num_warmup_steps})"
        )
    if args.inference_only and args.save_model:
        raise DLRMError("--save-model has nothing to save with --inference-only")
    if args.mlperf_logging and importlib.util.find_spec("sklearn") is None:
        raise DLRMError("--mlperf-logging needs scikit-learn for the original's test metrics (recall, precision, f1, "
                        "ap): pip install scikit-learn")
    if args.embedding_precision == "bf16":
        check_bf16_tables(args)
    validate_quantization_args(args)
    if distributed:
        ext_dist.choose_backend(args.dist_backend, args.use_gpu)  # one that cannot work fails before joining
    elif args.dist_backend and args.dist_backend not in ext_dist.BACKENDS:
        raise DLRMError(f"--dist-backend {args.dist_backend!r} is not one of {', '.join(ext_dist.BACKENDS)}")
    notes = [f"note: {name} has no effect {condition.unless(args)}" for name, condition in ineffective]
    if not args.sync_dense_params:  # the original's False only changed its several-GPUs-in-one-process mode
        notes.append("note: --sync-dense-params=False has no effect: dense parameters are always kept in sync "
                     "(each process holds one replica on one device)")
    return notes


def gaussian_ids_problem(low: float, high: float, rows: int) -> str | None:
    """What is wrong with gaussian random ids in [low, high] (--rand-data-min/max) for tables of at least `rows`
    rows, or None: the ids are the clipped values truncated to integers, as the original, and must be rows."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"--rand-data-min {low:g} / --rand-data-max {high:g}: gaussian ids need finite bounds"
    first, last = float(math.trunc(low)), float(math.trunc(high))
    if first < 0 or last > rows - 1:
        return (f"--rand-data-min {low:g} / --rand-data-max {high:g}: gaussian ids are the values between them "
                f"truncated ({first:.15g} .. {last:.15g}), but the smallest table of --arch-embedding-size has {rows} rows "
                f"(ids 0 .. {rows - 1})")
    return None


def profiling_rank() -> int | None:
    """The rank that names a distributed process's profiling files; None in a single process."""
    launch = ext_dist.launch_info()
    return launch.rank if launch is not None and launch.world_size > 1 else None


def check_bf16_tables(args):
    """--embedding-precision=bf16: what it works with (CPU training fused with SGD), else a DLRMError."""
    others = {"--optimizer=" + args.optimizer: args.optimizer != "sgd",
              "--use-gpu": args.use_gpu,
              "--precision=fp16": args.precision == "fp16",
              f"--mlperf-grad-accum-iter={args.mlperf_grad_accum_iter}": args.mlperf_grad_accum_iter > 1,
              "--qr-flag": args.qr_flag, "--md-flag": args.md_flag,
              "--weighted-pooling": args.weighted_pooling is not None,
              "--save-onnx": args.save_onnx,
              "--quantize-emb-with-bit": args.quantize_emb_with_bit != 32}
    for name, given in others.items():
        if given:
            raise DLRMError(f"not supported yet: --embedding-precision=bf16 with {name} (bfloat16 tables are "
                            "trained on the CPU with SGD, one step per batch)")
    if not args.inference_only and not kernels.native():  # the update; lookups run without them
        raise DLRMError(f"--embedding-precision=bf16 needs the native kernels to train: {kernels.status()}")


def validate_quantization_args(args):
    for name in ("quantize_mlp_with_bit", "quantize_emb_with_bit"):
        if getattr(args, name) != 32:
            flag_name = "--" + name.replace("_", "-")
            if not args.inference_only:
                raise DLRMError(f"{flag_name} needs --inference-only (quantized training is not supported)")
            if args.use_gpu:
                raise DLRMError(f"{flag_name}: quantized inference runs on the CPU, drop --use-gpu")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def fit_workers_to_cpus(args, cpus: int | None = None) -> list[str]:
    """Lowers --num-workers / --test-num-workers above the CPU count to it; returns the note saying so,
    naming the flags given (test workers only when a test runs). More workers than CPUs only compete
    for them (and make PyTorch warn mid-output)."""
    cpus = cpus or usable_cpus()
    named = ["num_workers"]
    if testing(args) and "test_num_workers" not in getattr(args, "_derived", ()):
        named.append("test_num_workers")  # when derived it follows --num-workers, named already
    lowered = [f"--{dest.replace('_', '-')}={getattr(args, dest)}" for dest in named if getattr(args, dest) > cpus]
    args.num_workers = min(args.num_workers, cpus)
    args.test_num_workers = min(args.test_num_workers, cpus)
    if not lowered:
        return []
    return [f"note: {' and '.join(lowered)} lowered to {cpus}, the number of CPUs this process may use"]


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args._derived = set()  # flags not given that took their value from another flag
    for dest, source in DERIVED_DEFAULTS.items():
        if getattr(args, dest) == -1:
            setattr(args, dest, getattr(args, source))
            args._derived.add(dest)
    return args


# ============================================================================ training pieces
def lr_for_update(update: int, base_lr: float, warmup: int, decay_start: int, num_decay: int) -> float:
    """Learning rate of the `update`-th optimizer step (1-based), the original's LRPolicyScheduler:
    linear warmup base*u/W for u < W; then base; quadratic decay base*((N-(u-D))/N)^2 (>= 1e-7)
    for D <= u < D+N; after the decay the last decayed value."""
    if update < warmup:
        return base_lr * update / warmup
    if num_decay > 0 and update >= decay_start:
        decayed = min(update - decay_start, num_decay - 1)
        return max(1e-7, base_lr * ((num_decay - decayed) / num_decay) ** 2)
    return base_lr


def per_sample_loss(kind: str, z, target, loss_weights=None):
    """Per-sample loss, [B, 1]: mse, bce, or wbce (bce times the weight of each sample's class: its target
    truncated to an integer, as the original's `loss_ws[T.long()]`, so a target below 1 is a negative)."""
    if kind == "mse":
        return (z - target) ** 2
    bce = F.binary_cross_entropy(z, target, reduction="none")
    if kind == "wbce":
        return loss_weights[target.long()] * bce
    return bce


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (ties count one half), labels binarised at 0.5; NaN with one class."""
    scores = scores.reshape(-1).double()
    positive = labels.reshape(-1) >= 0.5
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    _, group, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # 1-based rank, averaged over ties
    positive_rank_sum = mean_rank[group][positive[order]].sum().item()
    return (positive_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclasses.dataclass
class TestMetrics:
    loss: float
    accuracy: float
    auc: float
    samples: int
    # with --mlperf-logging, as the original prints them: at the 0.5 threshold (recall, precision, f1) and the
    # average precision (sklearn.metrics); NaN otherwise
    recall: float = float("nan")
    precision: float = float("nan")
    f1: float = float("nan")
    ap: float = float("nan")


def model_output(model, batch, where: str) -> torch.Tensor:
    """model(batch); an id outside its table (data that do not fit the tables) as a DLRMError naming `where`."""
    try:
        return model(batch.dense_x, batch.sparse)
    except TableIndexError as e:
        raise DLRMError(f"{where}: {e}") from None


@torch.no_grad()
def evaluate(model, dataset, loss_kind, loss_weights, device, num_workers=0, precision="fp32",
             show_progress=False, classification=False) -> TestMetrics:
    """Loss, accuracy and AUC over every sample of `dataset` (read back once, at the end); with `classification`
    also recall, precision, F1 and average precision (the original's --mlperf-logging metrics)."""
    was_training = model.training
    model.eval()
    scores, targets = [], []
    loader = dlrm_data.make_loader(dataset, num_workers=num_workers, pin_memory=device.type == "cuda")
    progress = ProgressBar("testing", len(dataset), show=show_progress, with_loss=False)
    for k, batch in enumerate(device_batches(loader, device)):
        with autocast(precision, device):
            z = model_output(model, batch, f"test batch {k + 1}")
        scores.append(z.float())
        targets.append(batch.target.clone())  # a loader worker's tensor holds a file descriptor while kept
        progress.step(batch.global_batch_size)
    progress.close()
    model.train(was_training)
    scores, targets = torch.cat(scores), torch.cat(targets)
    # in a distributed run each process scored its share of every test batch
    scores, targets = ext_dist.all_gather_rows(scores), ext_dist.all_gather_rows(targets)
    if not bool(torch.isfinite(scores).all()):
        raise DLRMError(f"the model's predictions on the test set are not finite ({int((~torch.isfinite(scores)).sum())} "
                        f"of {scores.numel()}): its weights hold NaN or inf")
    loss = per_sample_loss(loss_kind, scores, targets, loss_weights).mean().item()
    accuracy = (torch.round(scores) == targets).double().mean().item()
    metrics = TestMetrics(loss, accuracy, roc_auc(scores, targets), targets.shape[0])
    if classification:
        metrics.recall, metrics.precision, metrics.f1, metrics.ap = classification_metrics(scores, targets)
    return metrics


def classification_metrics(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float, float]:
    """Recall, precision and F1 of the predictions rounded at 0.5, and the average precision of the scores
    (sklearn.metrics, as the original's --mlperf-logging test; 0 where a ratio has no denominator, NaN for
    the average precision of a test set without positives). Labels binarised at 0.5."""
    import warnings

    from sklearn import metrics as sk

    y_true = (targets.reshape(-1) >= 0.5).cpu().numpy().astype(np.int64)
    y_score = scores.reshape(-1).double().cpu().numpy()
    y_pred = np.round(y_score).astype(np.int64)
    with warnings.catch_warnings():  # a test set without positives or without positive predictions
        warnings.simplefilter("ignore")
        ap = float(sk.average_precision_score(y_true, y_score)) if y_true.any() else float("nan")
        return (float(sk.recall_score(y_true, y_pred, zero_division=0)),
                float(sk.precision_score(y_true, y_pred, zero_division=0)),
                float(sk.f1_score(y_true, y_pred, zero_division=0)), ap)


def is_better(metrics: TestMetrics, best_auc: float, best_acc: float) -> bool:
    """Improvement in AUC (the first defined AUC is one), or in accuracy when AUC is undefined (one class)."""
    if not math.isnan(metrics.auc):
        return math.isnan(best_auc) or metrics.auc > best_auc
    return metrics.accuracy > best_acc


def format_auc(auc: float) -> str:
    """AUC to 4 decimals; NaN (a test set of one class, or no defined AUC yet) is `undefined`."""
    return "undefined" if math.isnan(auc) else f"{auc:.4f}"


@dataclasses.dataclass
class TrainState:
    """Where training stands; saved in checkpoints."""

    epoch: int = 0
    next_batch: int = 0  # first batch of `epoch` still to train
    updates: int = 0  # optimizer steps taken
    best_acc: float = 0.0
    best_auc: float = float("nan")  # until a test set with both classes gives one
    saved: bool = False  # whether this run has written --save-model (not carried over by a resume)
    last_test: TestMetrics | None = None
    train_loss: float = float("nan")
    skip_samples: int = 0  # samples of batch `next_batch` already trained (resumed with another batch size)
    batch_size: int = 0  # --mini-batch-size of the position; 0: unknown (checkpoints of earlier versions)
    data_order: dict = dataclasses.field(default_factory=dict)  # see data_order()


def save_checkpoint(path, model, optimizer, state: TrainState, args, nbatches, nbatches_test):
    """Writes atomically: a temporary file renamed over `path`.

    A distributed model is first gathered whole on rank 0, which alone writes the single-process format.
    """
    if isinstance(model, ext_dist.DistributedDLRM):
        model, optimizer = ext_dist.gather_to_rank0(model, optimizer)
        if model is None:
            return
    checkpoint = {
        "state_dict": to_original_keys(model.state_dict(), model),
        "opt_state_dict": (to_original_optimizer_state(optimizer.state_dict(), model, state.updates)
                           if optimizer is not None else None),
        "train_state": dataclasses.asdict(state),
        "arch": model_arch(model),
        # the original's keys, for scripts that read them
        "epoch": original_position(state, nbatches)[0],
        "iter": original_position(state, nbatches)[1],
        "nepochs": args.nepochs,
        "nbatches": nbatches,
        "nbatches_test": nbatches_test,
        "train_loss": state.train_loss,
        "total_loss": 0.0,  # the original's loss summed since its last progress line: 0 at its saves (every test
        # prints a progress line first)
        "test_loss": state.last_test.loss if state.last_test else float("nan"),
        "test_acc": state.last_test.accuracy if state.last_test else 0.0,
        "test_auc": state.last_test.auc if state.last_test else float("nan"),
    }
    outputs.write_atomically("--save-model", path, lambda tmp: torch.save(checkpoint, tmp))


def original_position(state: TrainState, nbatches: int) -> tuple[int, int]:
    """(epoch, batches done in it) as the original saves and prints a position: the start of an epoch is the end
    of the one before (an epoch above the one it trains in would hang its resume)."""
    if state.next_batch == 0 and state.epoch > 0:
        return state.epoch - 1, nbatches
    return state.epoch, state.next_batch


def model_arch(model: DLRM_Net) -> dict:
    """What a checkpoint must match to be loaded (see describe_arch_diff)."""
    arch = {
        "table_sizes": list(model.table_sizes),
        "embedding_dim": model.embedding_dim,
        "interaction": model.arch_interaction_op,
        "interaction_itself": model.arch_interaction_itself,
        "layers": {k: list(v.shape) for k, v in model.state_dict().items()},
    }
    options = model.interaction_config.options()
    if options:  # dcn's layers and rank, projection's branch widths, by flag (dot and cat have none)
        arch["interaction_options"] = options
    return arch


def load_checkpoint(path, model, optimizer, check=None, counts=None) -> TrainState:
    """Loads a checkpoint (ours or the original's) into model and optimizer; returns its TrainState.
    check(state), when given, runs on the saved state before the model is compared and loaded; `counts`, a dict,
    receives the run's nepochs, nbatches and nbatches_test that the checkpoint records (rank 0's only)."""
    if isinstance(model, ext_dist.DistributedDLRM):  # rank 0 reads it whole and hands out the tables
        return ext_dist.load_distributed(path, model, optimizer,
                                         functools.partial(load_checkpoint, check=check, counts=counts))
    if not os.path.isfile(path):
        raise DLRMError(f"--load-model {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise DLRMError(f"--load-model {path}: not a readable checkpoint ({type(e).__name__}: {e})")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DLRMError(f"--load-model {path}: not a DLRM checkpoint (no state_dict)")
    if counts is not None:
        counts.update({key: checkpoint[key] for key in ("nepochs", "nbatches", "nbatches_test")
                       if isinstance(checkpoint.get(key), int)})
    for key in ("train_state", "arch"):
        if checkpoint.get(key) is not None and not isinstance(checkpoint[key], dict):
            raise DLRMError(f"--load-model {path}: not a DLRM checkpoint ({key} is a {type(checkpoint[key]).__name__})")
    saved = dict(checkpoint.get("train_state") or {})
    try:
        if saved:
            last_test = saved.pop("last_test", None)
            known = {field.name for field in dataclasses.fields(TrainState)}
            state = TrainState(**{k: v for k, v in saved.items() if k in known})  # fields of other versions dropped
            state.last_test = TestMetrics(**last_test) if last_test else None
        else:
            state = original_train_state(checkpoint)
            if any(getattr(module, "operation", None) == "mult" for module in model.emb_l.modules()
                   if isinstance(module, QREmbeddingBag)):
                print(f"note: --load-model {path}: the original's QR tables (--qr-operation=mult) multiply a bag's "
                      "pooled quotient and remainder embeddings; this trainer pools their products per id (the "
                      "paper's): the same for bags of one id (Criteo data), other values for larger bags",
                      file=sys.stderr)
        for field in ("epoch", "next_batch", "updates", "batch_size", "skip_samples"):
            if not isinstance(getattr(state, field, 0), int):
                raise TypeError(f"{field} is {getattr(state, field)!r}, not a whole number")
    except (TypeError, ValueError) as e:  # fields of the wrong kind
        raise DLRMError(f"--load-model {path}: its training state cannot be read ({type(e).__name__}: {e})")
    if check is not None:
        check(state)
    saved_arch = checkpoint.get("arch")
    if saved_arch is not None and saved_arch != model_arch(model):
        try:
            difference = describe_arch_diff(saved_arch, model_arch(model))
        except (TypeError, AttributeError, ValueError, IndexError):  # fields of the wrong kind
            difference = "its architecture record cannot be read"
        raise DLRMError(f"--load-model {path}: saved with a different architecture than these flags ({difference})")
    try:
        model.load_state_dict(from_original_keys(checkpoint["state_dict"], model))
    except Exception as e:  # shapes, keys, or no state_dict at all (a foreign file)
        raise DLRMError(f"--load-model {path}: does not fit this model: {state_dict_problem(e)}")
    not_finite = next((name for name, value in model.state_dict().items()
                       if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
    if not_finite is not None:
        raise DLRMError(f"--load-model {path}: the saved {not_finite} holds NaN or infinite values (saved from a "
                        "diverged run?); such a model can be neither trained nor evaluated")
    if optimizer is not None and checkpoint.get("opt_state_dict"):
        try:
            optimizer.load_state_dict(from_original_optimizer_state(
                checkpoint["opt_state_dict"], model, getattr(optimizer, "row_wise_sparse", False)))
        except Exception as e:  # another optimizer's state, or a malformed one
            raise DLRMError(f"--load-model {path}: optimizer state does not fit --optimizer ({type(e).__name__}: "
                            f"{state_dict_problem(e)})")
    elif isinstance(optimizer, tuple(OPTIMIZERS[name] for name in ADAGRADS)):  # SGD keeps no state
        print(f"note: --load-model {path} holds no optimizer state: Adagrad's sums of squared gradients start "
              "from zero", file=sys.stderr)
    return state


def to_original_keys(state_dict: dict, model: DLRM_Net) -> dict:
    """`state_dict` (the model's) under the original's names, so that the original loads our checkpoints: QR
    tables' `emb_l.<k>.embs_q.weight` / `embs_r.weight` -> `emb_l.<k>.weight_q` / `weight_r`; learned pooling
    weights `pooling_weights.weight` ([all rows, 1]) -> one `v_W_l.<k>` [rows of table k] per table; fixed ones
    left out when all are 1 (the original does not save them), else kept as they are. `from_original_keys`
    reverses it."""
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("emb_l.") and key.endswith((".embs_q.weight", ".embs_r.weight")):
            key = key[: -len(".embs_q.weight")] + (".weight_q" if key.endswith(".embs_q.weight") else ".weight_r")
        renamed[key] = value
    pooling = renamed.pop("pooling_weights.weight", None)
    if pooling is not None:
        if model.pooling_weights.learned:
            for k, rows in enumerate(pooling.split(model.table_sizes)):
                renamed[f"v_W_l.{k}"] = rows.reshape(-1)
        elif not bool((pooling == 1).all()):  # chosen fixed weights: ours only
            renamed["pooling_weights.weight"] = pooling
    return renamed


def from_original_keys(state_dict, model: DLRM_Net):
    """`state_dict` with the original's names of embedding tricks' parameters renamed to the model's: QR tables'
    `emb_l.<k>.weight_q` / `weight_r` -> `emb_l.<k>.embs_q.weight` / `embs_r.weight`; learned pooling weights
    `v_W_l.<k>` ([rows of table k]) -> `pooling_weights.weight` ([all rows, 1], tables in order); pooling
    weights not saved (fixed ones of 1: neither the original nor this trainer saves them) are ones. Other
    mappings pass unchanged."""
    if not isinstance(state_dict, dict):
        return state_dict  # load_state_dict names the problem
    ours = model.state_dict()
    renamed = {}
    for key, value in state_dict.items():
        for old, new in ((".weight_q", ".embs_q.weight"), (".weight_r", ".embs_r.weight")):
            if key.startswith("emb_l.") and key.endswith(old) and key not in ours and key[: -len(old)] + new in ours:
                key = key[: -len(old)] + new
        renamed[key] = value
    pooled = sorted((int(key.split(".")[1]), key) for key in renamed
                    if key.startswith("v_W_l.") and key.split(".")[1].isdigit())
    if pooled and "pooling_weights.weight" in ours and "pooling_weights.weight" not in renamed:
        renamed["pooling_weights.weight"] = torch.cat([renamed.pop(key).reshape(-1) for _, key in pooled]).unsqueeze(1)
    if ("pooling_weights.weight" in ours and "pooling_weights.weight" not in renamed
            and any(key.startswith("emb_l.") for key in renamed)):  # fixed weights of 1 are not saved
        renamed["pooling_weights.weight"] = torch.ones_like(ours["pooling_weights.weight"])
    return renamed


def from_original_optimizer_state(opt_state: dict, model: DLRM_Net, row_wise_sparse: bool = False) -> dict:
    """`opt_state` for `model`'s parameters: the original's torch.optim state (one parameter group in
    `model.parameters()` order, with one parameter per table, `emb_l.<k>.weight`, and with learned pooling one
    per table's weights, `v_W_l.<k>`) has the entries of the parameters that the model holds as one merged:
    the tables' into the one batched table weight (`BatchedEmbeddingBags`), the pooling weights' into
    `pooling_weights.weight`. Each state tensor is concatenated in table order and shaped as the model's
    optimizer keeps it (Adagrad's `sum` as the parameter; with `row_wise_sparse`, RWSAdagrad's, one value per
    row), the largest `step` kept; RWSAdagrad's per-row `momentum` becomes `sum`. Any other state is
    returned as it is (`load_state_dict` checks it). ValueError when only some tables have state, or a
    merged state does not fit the parameter."""
    if not isinstance(opt_state, dict):
        return opt_state
    state = opt_state.get("state")
    if isinstance(state, dict):  # RWSAdagrad's per-row `momentum` is our `sum`
        state = {number: {("sum" if k == "momentum" else k): v for k, v in entry.items()}
                 if isinstance(entry, dict) else entry for number, entry in state.items()}
        opt_state = {**opt_state, "state": state}
    params, tables = list(model.parameters()), len(model.table_sizes)
    spans = _original_parameter_spans(model)
    if spans is None:  # parameters one to one
        return opt_state
    groups = opt_state.get("param_groups")
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict) and isinstance(state, dict)
            and tables > 1 and len(groups[0].get("params", ())) == sum(spans)):
        return opt_state
    numbers = list(groups[0]["params"])
    merged_state, first = {}, 0
    for ours, (p, span) in enumerate(zip(params, spans)):
        entries = [state.get(number) or {} for number in numbers[first:first + span]]
        first += span
        if span == 1:
            if numbers[first - 1] in state:
                merged_state[ours] = state[numbers[first - 1]]
            continue
        if not any(entries):
            continue
        if not all(entries) or any(set(entry) != set(entries[0]) for entry in entries):
            raise ValueError("the saved state holds optimizer state for some tables but not for all")
        merged = {}
        for key in entries[0]:
            values = [entry[key] for entry in entries]
            if key == "step":
                merged[key] = max(values, key=float)
            elif all(not isinstance(v, torch.Tensor) for v in values) and all(v == values[0] for v in values):
                merged[key] = values[0]  # a setting of the one table (bfloat16 tables' rounding seed)
            elif all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in values):
                value = torch.cat([v.reshape(v.shape[0], -1) for v in values])
                shape = p.shape[:1] if row_wise_sparse else p.shape
                if value.numel() != math.prod(shape):
                    raise ValueError(f"the saved tables' '{key}' ({value.numel()} values) does not fit "
                                     f"{list(shape)}")
                merged[key] = value.reshape(shape)
            else:
                raise ValueError(f"the saved tables' '{key}' cannot be merged into one table's")
        merged_state[ours] = merged
    return {"state": merged_state, "param_groups": [{**groups[0], "params": list(range(len(params)))}]}


def _original_parameter_spans(model: DLRM_Net) -> list[int] | None:
    """How many of the original's parameters each of `model.parameters()` holds: the tables of the batched
    table weight, or the per-table `v_W_l.<k>` of the learned pooling weights; None when one to one."""
    params, tables = list(model.parameters()), len(model.table_sizes)
    if isinstance(model.emb_l, BatchedEmbeddingBags):  # the original's tables in our one weight
        return [tables] + [1] * (len(params) - 1)
    if model.pooling_weights is not None and model.pooling_weights.learned:  # its v_W_l.<k> in our one weight
        before = len(list(model.emb_l.parameters()))
        return [1] * before + [tables] + [1] * (len(params) - before - 1)
    return None


# the settings torch.optim.SGD / Adagrad and the original's RWSAdagrad keep in a parameter group (and need to step)
ORIGINAL_GROUP_SETTINGS = {
    "SGD": {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False, "foreach": None,
            "differentiable": False, "fused": None},
    "Adagrad": {"lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0.0, "eps": 1e-10, "foreach": None,
                "maximize": False, "differentiable": False, "fused": None},
    "RWSAdagrad": {"lr_decay": 0.0, "eps": 1e-10, "weight_decay": 0.0, "initial_accumulator_value": 0.0},
}


def to_original_optimizer_state(opt_state: dict, model: DLRM_Net, updates: int) -> dict:
    """`opt_state` (our SGD's, Adagrad's or RWSAdagrad's) laid out as the original's optimizer keeps it, so that
    the original resumes our checkpoints: one group of its parameters in `model.parameters()` order with one
    per table (`_original_parameter_spans`: the batched table's state split into `emb_l.<k>.weight`'s, the
    learned pooling weights' into `v_W_l.<k>`'s, [rows of table k]); the group's settings as torch.optim.SGD /
    Adagrad and its RWSAdagrad hold them (ORIGINAL_GROUP_SETTINGS); every parameter's `step` (`updates`: a
    float tensor for Adagrad, an int for RWSAdagrad, as they keep it) and, for Adagrad, a `sum` (zeros before
    the first update); RWSAdagrad's one value per row of a table is its `momentum`. The "optimizer" entry
    stays (torch.optim ignores it). `from_original_optimizer_state` reverses it. Other states are returned
    as they are."""
    kind = opt_state.get("optimizer")
    groups = opt_state.get("param_groups")
    if kind not in ORIGINAL_GROUP_SETTINGS or not isinstance(groups, list) or len(groups) != 1:
        return opt_state
    params = list(model.parameters())
    spans = _original_parameter_spans(model) or [1] * len(params)
    if len(groups[0]["params"]) != len(params):
        return opt_state
    state, pieces = opt_state["state"], []  # pieces: (the original's parameter shape, its state)
    for number, p, span in zip(groups[0]["params"], params, spans):
        entry = state.get(number, {})
        if span == 1:
            pieces.append((p.shape, dict(entry)))
            continue
        rows = [int(n) for n in model.table_sizes]
        table_shapes = [torch.Size([n]) if p.shape[1:] == (1,) else torch.Size([n, *p.shape[1:]]) for n in rows]
        split = [dict() for _ in rows]
        for key, value in entry.items():
            parts = value.split(rows) if isinstance(value, torch.Tensor) and value.dim() else [value] * len(rows)
            for table, part, shape in zip(split, parts, table_shapes):
                table[key] = part.reshape(-1) if isinstance(part, torch.Tensor) and len(shape) == 1 else part
        pieces.extend(zip(table_shapes, split))
    settings = {**ORIGINAL_GROUP_SETTINGS[kind], **{k: v for k, v in groups[0].items() if k != "params"}}
    original_state = {}
    for number, (shape, entry) in enumerate(pieces):
        if kind == "SGD":
            if entry:
                original_state[number] = entry
            continue
        if "sum" not in entry and kind == "Adagrad":
            entry["sum"] = torch.full(shape, float(settings["initial_accumulator_value"]))
        if kind == "RWSAdagrad" and "sum" in entry and len(shape) > 1 and entry["sum"].shape == shape[:1]:
            entry["momentum"] = entry.pop("sum")
        entry["step"] = torch.tensor(float(updates)) if kind == "Adagrad" else int(updates)
        original_state[number] = entry
    return {"state": original_state, "param_groups": [{**settings, "params": list(range(len(pieces)))}],
            "optimizer": kind}


def state_dict_problem(error: Exception, limit: int = 200) -> str:
    """The first detail of a load_state_dict error (missing or unexpected keys, a size mismatch), one line
    shortened to `limit` characters; PyTorch puts it under a heading line that names only the class."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines[1:]), lines[0] if lines else type(error).__name__)
    detail = detail.rstrip(". ")
    return detail if len(detail) <= limit else detail[:limit - 3] + "..."


def original_train_state(checkpoint: dict) -> TrainState:
    """The position and metrics that the original's checkpoints store: epoch, iter, train_loss, and the
    test accuracy (its best) and, with --mlperf-logging, the best test AUC."""
    nan = float("nan")
    test_acc, test_auc = checkpoint.get("test_acc"), checkpoint.get("test_auc", nan)
    state = TrainState(epoch=int(checkpoint.get("epoch", 0)), next_batch=int(checkpoint.get("iter", 0)),
                       train_loss=float(checkpoint.get("train_loss", nan)))
    if test_acc is not None:
        state.best_acc, state.best_auc = float(test_acc), float(test_auc)
        state.last_test = TestMetrics(float(checkpoint.get("test_loss", nan)), float(test_acc), float(test_auc), 0)
    return state


def data_order(args, train_set) -> dict:
    """{flag: value} of what decides which training rows come in which order (for this data source)."""
    order = {"--data-generation": args.data_generation}
    if args.multi_hot_sizes:  # the ids of every bag
        order["--multi-hot-sizes"] = "-".join(str(n) for n in args.multi_hot_sizes)
        order["--multi-hot-distribution-type"] = args.multi_hot_distribution_type
    if args.data_generation != "dataset":
        order["--numpy-rand-seed"] = args.numpy_rand_seed  # batch j is drawn from (seed, j)
        if args.data_generation == "synthetic":
            order["--data-trace-file"] = args.data_trace_file
        return order
    bin_shuffle = bool(args.mlperf_bin_loader and args.mlperf_bin_shuffle)
    rows = getattr(train_set, "dataset", train_set)
    randomize = rows.randomize  # "none" for data shuffled when written, whatever the flag
    order.update({"--data-set": args.data_set,
                  "--data-sub-sample-rate": args.data_sub_sample_rate,
                  "--raw-data-file / --processed-data-file (training rows)":
                      f"{dataset_samples(train_set, 1)} rows, digest {rows.fingerprint()}",
                  "--data-randomize": randomize,
                  "--mlperf-bin-shuffle": bin_shuffle})
    if randomize != "none" or bin_shuffle:
        order["--numpy-rand-seed"] = args.numpy_rand_seed
    return order


def check_data_order(state: TrainState, order: dict, path: str, log=print, epoch_batches: int | None = None):
    """Raises DLRMError when a flag that decides the rows still to train in the checkpoint's epoch
    differs from the checkpoint's (see data_order); at an epoch's start or end a change is only noted (later
    epochs follow the new value). `epoch_batches`: the saving run's batches per epoch, when the checkpoint
    records them. Checkpoints that do not record the order pass."""
    at_end = bool(epoch_batches) and state.next_batch >= epoch_batches and not state.skip_samples
    inside_epoch = (state.next_batch > 0 or state.skip_samples > 0) and not at_end
    where = f"the end of epoch {state.epoch}" if at_end else f"the start of epoch {state.epoch}"
    for key in dict.fromkeys([*state.data_order, *order]) if state.data_order else ():
        old, new = state.data_order.get(key, "not in effect"), order.get(key, "not in effect")
        if old == new:
            continue
        if inside_epoch:
            what = "train other bags of ids than its first part did" if key.startswith("--multi-hot") else \
                "skip or repeat rows"
            raise DLRMError(f"--load-model {path}: {key} was {old}, now {new}: the rest of epoch {state.epoch} "
                            f"would {what}; resume with the checkpoint's value")
        log(f"note: {key} was {old} in the checkpoint, now {new} (it is at {where})")


def resume_position(state: TrainState, args, order: dict, path: str, log=print) -> TrainState:
    """Moves the checkpoint's position to the same sample of its epoch under this run's
    --mini-batch-size (checkpoints that do not record their batch size keep their batch)."""
    if state.batch_size and state.batch_size != args.mini_batch_size:
        sample = state.next_batch * state.batch_size + state.skip_samples
        if sample and order.get("--mlperf-bin-shuffle"):
            raise DLRMError(f"--load-model {path}: --mini-batch-size was {state.batch_size}, now "
                            f"{args.mini_batch_size}: with --mlperf-bin-shuffle the rest of epoch {state.epoch} "
                            f"depends on it; resume with --mini-batch-size={state.batch_size}")
        state.next_batch, state.skip_samples = divmod(sample, args.mini_batch_size)
        if sample:
            log(f"Resuming at sample {sample} of epoch {state.epoch} (--mini-batch-size was {state.batch_size}, "
                f"now {args.mini_batch_size}: batch {state.next_batch}"
                + (f", from its sample {state.skip_samples})" if state.skip_samples else ")"))
    state.batch_size, state.data_order = args.mini_batch_size, order
    return state


def flag_text(value) -> str:
    """A flag's value as written on the command line (lists dash-separated)."""
    return "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


ARCH_FLAGS = {"table_sizes": "--arch-embedding-size (the tables' rows)", "embedding_dim": "--arch-sparse-feature-size",
              "interaction": "--arch-interaction-op", "interaction_itself": "--arch-interaction-itself"}


def mlp_widths(layers: dict, prefix: str) -> list[int] | None:
    """The widths (input first) of the MLP whose Linear weights are `layers`' `<prefix>.<k>.weight` shapes, in k
    order; None when it has none."""
    weights = sorted((int(name.split(".")[1]), shape) for name, shape in layers.items()
                     if name.startswith(prefix + ".") and name.endswith(".weight") and len(shape) == 2)
    if not weights:
        return None
    return [weights[0][1][1]] + [shape[0] for _, shape in weights]


def describe_arch_diff(saved: dict, current: dict) -> str:
    """The differences between a checkpoint's `model_arch` and the flags' model, by flag: the tables, widths,
    interaction and its options, and the MLPs' widths; only when none of these differ, the parameters whose
    shapes differ (what embedding tricks such as --qr-flag, --md-flag or --weighted-pooling change)."""
    problems = [f"{flag}: saved {flag_text(saved.get(key))}, flags give {flag_text(current.get(key))}"
                for key, flag in ARCH_FLAGS.items() if saved.get(key) != current.get(key)]
    old, new = saved.get("interaction_options") or {}, current.get("interaction_options") or {}
    if saved.get("interaction") == current.get("interaction"):
        problems += [f"{flag}: saved {flag_text(old.get(flag))}, flags give {flag_text(new.get(flag))}"
                     for flag in dict.fromkeys([*old, *new]) if old.get(flag) != new.get(flag)]
    old, new = saved.get("layers") or {}, current.get("layers") or {}
    for prefix, flag in (("bot_l", "--arch-mlp-bot"), ("top_l", "--arch-mlp-top")):
        before, after = mlp_widths(old, prefix), mlp_widths(new, prefix)
        if before != after:  # the top MLP's input width follows the interaction: the flag leaves it out
            shown = [w[1:] if w and prefix == "top_l" else w for w in (before, after)]
            if shown[0] != shown[1] or not problems:
                problems.append(f"{flag}: saved {flag_text(shown[0])}, flags give {flag_text(shown[1])}")
    if problems:
        return "; ".join(problems)
    names = [name for name in dict.fromkeys([*old, *new]) if old.get(name) != new.get(name)]
    if not names:
        return "unknown difference"

    def shape(name, layers):
        return "x".join(map(str, layers[name])) if name in layers else "none"

    shown = "; ".join(f"{name}: saved {shape(name, old)}, flags give {shape(name, new)}" for name in names[:3])
    more = f"; and {len(names) - 3} more" if len(names) > 3 else ""
    if all(name.startswith(("emb_l.", "pooling_weights.")) for name in names):
        return f"the embedding tables' parameters differ ({shown}{more}; --qr-flag, --md-flag and " \
               "--weighted-pooling change them)"
    return f"parameter shapes differ ({shown}{more})"


# ============================================================================ setup helpers
def select_device(use_gpu: bool, index: int = 0) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        print(f"Using {torch.cuda.device_count()} GPU(s)...")
        return torch.device("cuda", index)
    if use_gpu:
        print(f"warning: --use-gpu given but CUDA is not available (torch {torch.__version__}); running on CPU",
              file=sys.stderr)
    print("Using CPU...")
    return torch.device("cpu")


def generated_set_sizes(args) -> tuple[int, int]:
    """Samples of the training and test sets of random or synthetic data. --num-batches caps training
    only: the test set keeps --data-size samples (more when the cap asks for more training samples than
    that: then, as in the original, it sets the data size)."""
    train = args.num_batches * args.mini_batch_size if args.num_batches > 0 else args.data_size
    return train, max(args.data_size, train)


def make_datasets(args):
    """Training and test datasets plus (dense width, table sizes) of the data. Multi-hot data (expanded on
    the fly, or materialized) sets args.multi_hot_sizes (one per table) and the distribution as used."""
    train, test, dense_dim, table_sizes = make_one_or_multi_hot_datasets(args)
    multi_hot = getattr(train, "multi_hot", None)
    if multi_hot is not None:  # what the run logs, the memory estimate and checkpoints record
        args.multi_hot_sizes, args.multi_hot_distribution_type = list(multi_hot.sizes), multi_hot.distribution
    return train, test, dense_dim, table_sizes


def make_one_or_multi_hot_datasets(args):
    """make_datasets's datasets, before the multi-hot settings are read back from them."""
    if args.data_generation == "dataset":
        try:
            # progress bars on a terminal only: a log gets no carriage returns
            train, test, table_sizes = dlrm_data.make_criteo_datasets(args, progress=stderr_is_terminal())
        except data_utils.DataError as e:
            raise DLRMError(str(e)) from None
        return train, test, data_utils.NUM_DENSE, table_sizes
    table_sizes = args.arch_embedding_size
    dense_dim = args.arch_mlp_bot[0]
    # multi-hot: one id per table and sample, drawn as the flags say, then expanded into its bag
    multi_hot = multihot.MultiHot(args.multi_hot_sizes, table_sizes, args.multi_hot_distribution_type) \
        if args.multi_hot_sizes else None
    config = dlrm_data.RandomDataConfig(
        num_indices_per_lookup=1 if multi_hot else args.num_indices_per_lookup,
        num_indices_per_lookup_fixed=True if multi_hot else args.num_indices_per_lookup_fixed,
        distribution=args.rand_data_dist,
        rand_min=args.rand_data_min,
        rand_max=args.rand_data_max,
        rand_mu=args.rand_data_mu,
        rand_sigma=args.rand_data_sigma,
        round_targets=args.round_targets,
    )
    num_samples, test_samples = generated_set_sizes(args)
    if args.data_generation == "synthetic":
        # sparse ids drawn from the trace distributions; a held-out set from its own streams
        def synthetic(split, batch_size, notes, samples=num_samples):
            return trace_data.SyntheticTraceDataset(
                dense_dim, table_sizes, samples, batch_size, args.numpy_rand_seed, config,
                args.data_trace_file, args.data_trace_enable_padding, split=split, notes=notes)

        try:
            train = synthetic(0, args.mini_batch_size, lambda text: print(text, file=sys.stderr))
            test = synthetic(1, args.test_mini_batch_size, lambda text: None, test_samples)
        except trace_data.TraceFileError as e:
            raise DLRMError(f"--data-trace-file: {e}")
        return dlrm_data.with_multi_hot(train, multi_hot), dlrm_data.with_multi_hot(test, multi_hot), dense_dim, \
            table_sizes
    train = dlrm_data.RandomDataset(dense_dim, table_sizes, num_samples, args.mini_batch_size,
                                    args.numpy_rand_seed, config, split=0)
    # a held-out set from its own random stream
    test = dlrm_data.RandomDataset(dense_dim, table_sizes, test_samples, args.test_mini_batch_size,
                                   args.numpy_rand_seed, config, split=1)
    return dlrm_data.with_multi_hot(train, multi_hot), dlrm_data.with_multi_hot(test, multi_hot), dense_dim, table_sizes


def top_mlp_widths(args, num_tables: int) -> list[int]:
    """The top MLP's layer widths: the interaction's output width, then --arch-mlp-top."""
    sparse_dim = embedding_output_dim(args.arch_sparse_feature_size, args.qr_flag, args.qr_operation)
    width = InteractionConfig.from_args(args).output_width(num_tables, args.arch_mlp_bot[-1], sparse_dim)
    return [width] + list(args.arch_mlp_top)


def dense_features_problem(dense_dim: int, first_width: int) -> str:
    return f"the data has {dense_dim} dense features but --arch-mlp-bot starts with {first_width}"


def build_model(args, dense_dim, table_sizes, embeddings: EmbeddingCollection | None = None) -> DLRM_Net:
    """The DLRM_Net the flags describe for data of `dense_dim` features and these tables; `embeddings`
    (e.g. a model-parallel collection) instead of the tables the flags describe."""
    ln_bot = list(args.arch_mlp_bot)
    if ln_bot[0] != dense_dim:
        raise DLRMError(dense_features_problem(dense_dim, ln_bot[0]))
    ln_top = top_mlp_widths(args, len(table_sizes))
    if embeddings is None and args.embedding_precision == "bf16":  # batched tables (validate_args), of that dtype
        embeddings = build_embeddings(args, table_sizes)
    if embeddings is None:
        tables = dict(qr_flag=args.qr_flag, qr_operation=args.qr_operation, qr_collisions=args.qr_collisions,
                      qr_threshold=args.qr_threshold, md_flag=args.md_flag, md_threshold=args.md_threshold,
                      md_temperature=args.md_temperature, md_round_dims=args.md_round_dims)
    else:
        tables = dict(embeddings=embeddings)
    return DLRM_Net(
        args.arch_sparse_feature_size,
        table_sizes,
        ln_bot,
        ln_top,
        arch_interaction_op=args.arch_interaction_op,
        arch_interaction_itself=args.arch_interaction_itself,
        dcn_num_layers=args.dcn_num_layers,
        dcn_low_rank_dim=args.dcn_low_rank_dim,
        interaction_branch1_layer_sizes=args.interaction_branch1_layer_sizes,
        interaction_branch2_layer_sizes=args.interaction_branch2_layer_sizes,
        sigmoid_bot=-1,
        sigmoid_top=len(ln_top) - 2,
        loss_threshold=args.loss_threshold,
        weighted_pooling=args.weighted_pooling,
        **tables,
    )


def build_embeddings(args, table_sizes, tables=None) -> EmbeddingCollection:
    """The embedding collection the flags describe; `tables` (global ids) builds only those."""
    return create_embeddings(table_sizes, args.arch_sparse_feature_size, args.qr_flag, args.qr_operation,
                             args.qr_collisions, args.qr_threshold, args.md_flag, args.md_threshold,
                             args.md_temperature, args.md_round_dims, per_table=args.weighted_pooling is not None,
                             tables=tables, dtype=torch.bfloat16 if args.embedding_precision == "bf16" else torch.float32)


def held_table_rows(args, table_sizes, local_tables=None) -> list[int]:
    """Rows of each table this process holds (`local_tables`: its tables' positions, None: all), a quotient and
    a remainder table for each table --qr-flag splits."""
    held = [table_sizes[t] for t in local_tables] if local_tables is not None else list(table_sizes)
    if args.qr_flag:
        held = [math.ceil(n / args.qr_collisions) + args.qr_collisions if n > args.qr_threshold else n for n in held]
    return held


def dense_mlps(args, dense_dim: int, num_tables: int) -> dict[str, list[list[int]]]:
    """The dense layers' widths (input first), keyed by the flags that size them: the bottom MLP, the
    interaction's own layers (none for dot and cat), the top MLP."""
    sparse_dim = embedding_output_dim(args.arch_sparse_feature_size, args.qr_flag, args.qr_operation)
    interaction = InteractionConfig.from_args(args)
    return {"--arch-mlp-bot": [[dense_dim] + list(args.arch_mlp_bot[1:])],
            " or ".join(interaction.options()): interaction.dense_layers(num_tables, args.arch_mlp_bot[-1], sparse_dim),
            "--arch-mlp-top": [top_mlp_widths(args, num_tables)]}


def ids_per_sample(args, table_sizes) -> float:
    """Ids a sample looks up, all tables together (on average for random bag sizes)."""
    if args.multi_hot_sizes:  # one bag of its table's size per table
        return float(sum(multihot.sizes_per_table(args.multi_hot_sizes, len(table_sizes))))
    if args.data_generation == "dataset":
        return float(len(table_sizes))
    return sum(memory.mean_bag_size(n, args.num_indices_per_lookup, args.num_indices_per_lookup_fixed)
               for n in table_sizes)


def estimate_memory(args, dense_dim: int, table_sizes, local_tables=None) -> memory.MemoryEstimate:
    """What this process will allocate (bytes): the model, the optimizer, a batch and the loaders
    (`memory.estimate_memory`), synthetic data's id streams, and a checkpoint to load."""
    held = held_table_rows(args, table_sizes, local_tables)
    ids = ids_per_sample(args, table_sizes)
    sparse_dim = embedding_output_dim(args.arch_sparse_feature_size, args.qr_flag, args.qr_operation)
    train_batch, test_batch = held_batch_sizes(args)
    if args.inference_only:  # the test set alone
        batch_size, workers = test_batch, args.test_num_workers
    else:  # a test runs while the last training batch, its activations and gradients are still held
        batch_size = train_batch + (test_batch if testing(args) else 0)
        workers = max(args.num_workers, args.test_num_workers if testing(args) else 0)
    mlps = [widths for layers in dense_mlps(args, dense_dim, len(table_sizes)).values() for widths in layers]
    needed = memory.estimate_memory(held, sparse_dim, mlps, batch_size, ids,
                                    None if args.inference_only else args.optimizer, workers,
                                    table_element_bytes=table_element_bytes(args))
    if args.data_generation == "synthetic":  # per table: an id stream, and where each batch starts in it
        samples, test_samples = generated_set_sizes(args)
        batches = math.ceil(samples / args.mini_batch_size) + math.ceil(test_samples / args.test_mini_batch_size)
        drawn = 1.0 if args.multi_hot_sizes else ids / len(table_sizes)  # multi-hot: one id, expanded later
        stream = min(max(samples, test_samples) * drawn, trace_data.MAX_STREAM_LENGTH)
        needed.data = int(len(table_sizes) * (2 * 8 * batches + 2 * 8 * stream))
    if args.load_model and os.path.isfile(args.load_model) and ext_dist.rank() == 0:  # rank 0 reads it for all
        needed.checkpoint = os.path.getsize(args.load_model)
    return needed


def held_batch_sizes(args) -> tuple[int, int]:
    """(training, test) samples per batch as held in memory: generated data's batches hold at most its samples."""
    train_batch, test_batch = args.mini_batch_size, args.test_mini_batch_size
    if args.data_generation != "dataset":
        samples, test_samples = generated_set_sizes(args)
        train_batch, test_batch = min(train_batch, samples), min(test_batch, test_samples)
    return train_batch, test_batch


def table_element_bytes(args) -> int:
    return 2 if args.embedding_precision == "bf16" else 4


def memory_remedy(args, part: str, dense_dim: int, table_sizes, local_tables=None) -> str:
    """What to make smaller when `part` (a MemoryEstimate part) is the largest: the flags that size it. For the
    parameters and the optimizer state, those of the largest of the tables and the dense layers."""
    mlps = {flags: layers for flags, layers in dense_mlps(args, dense_dim, len(table_sizes)).items() if layers}
    sparse_dim = embedding_output_dim(args.arch_sparse_feature_size, args.qr_flag, args.qr_operation)
    if part in ("parameters", "optimizer state"):
        tables = table_element_bytes(args) * sparse_dim * sum(held_table_rows(args, table_sizes, local_tables))
        weights = {flags: memory.weight_count(layers) for flags, layers in mlps.items()}
        flags = max(weights, key=weights.get)
        if 2 * memory.FLOAT * weights[flags] > tables:
            return f"a smaller {flags}"
        return "smaller tables (--arch-embedding-size, or --max-ind-range for a data set) or a smaller " \
               "--arch-sparse-feature-size"
    if part in ("one batch", "batch inputs", "loader buffers"):
        ids = "--multi-hot-sizes" if args.multi_hot_sizes else (
            None if args.data_generation == "dataset" else "--num-indices-per-lookup")
        train_batch, test_batch = held_batch_sizes(args)
        if args.inference_only or (testing(args) and test_batch > train_batch):  # the test batch is most of it
            batch_flags = ("--test-mini-batch-size", "--test-num-workers")
        else:
            batch_flags = ("--mini-batch-size", "--num-workers")
        batch_others = () if args.inference_only else ("--mini-batch-size", "--test-mini-batch-size")
        others = ", ".join(flag for flag in (*batch_others, ids, batch_flags[1]) if flag not in (None, batch_flags[0]))
        units = {flags: memory.unit_count(layers) for flags, layers in mlps.items()}
        flags = max(units, key=units.get)
        id_rows = ids_per_sample(args, table_sizes) * sparse_dim  # the embedding gradient's floats per sample
        if part == "one batch" and memory.ACTIVATION_COPIES * units[flags] > 2 * id_rows + sum(units.values()):
            return f"a smaller {flags} or {batch_flags[0]}"  # one group of layers' activations are most of it
        return f"a smaller {batch_flags[0]} (or {others})"
    if part == "data":
        return "a smaller --data-size (or --num-batches)"
    return "a machine with more memory for this checkpoint"


def check_memory(args, dense_dim: int, table_sizes, local_tables=None, device: torch.device | None = None):
    """Stops (DLRMError) before the model is built when the run needs more memory than the process may use:
    host memory, and on a CUDA `device` the device's free memory for the model, its optimizer state and a batch."""
    needed = estimate_memory(args, dense_dim, table_sizes, local_tables)
    on_cuda = device is not None and device.type == "cuda"
    checks = [(needed.in_host_memory(on_cuda), "memory", memory.usable_memory())]
    if on_cuda:
        checks.append((needed.on_device(), f"memory on {device}", memory.device_memory(device)))
    for parts, where, (usable, limited_by) in checks:
        if sum(parts.values()) <= usable:
            continue
        remedy = memory_remedy(args, max(parts, key=parts.get), dense_dim, table_sizes, local_tables)
        raise DLRMError(f"this run needs about {memory.gib(sum(parts.values()))} of {where} "
                        f"({memory.describe(parts)}) but this process may use {memory.gib(usable)} ({limited_by}); "
                        f"try {remedy}")


def build_optimizer(args, model: nn.Module):
    """The --optimizer for `model`; `train` zeroes the gradients after every step, so steps may reuse them.

    With SGD or (element-wise) Adagrad, a step after every backward (no --mlperf-grad-accum-iter, no fp16 loss
    scaling) and the tables on the CPU, the backward applies the tables' update itself
    (`BatchedEmbeddingBags.fuse_optimizer`): the same numbers as the step would compute (Adagrad: but for the
    rounding of its square roots), without the sparse gradient in between."""
    eps = args.adagrad_eps if args.optimizer in ADAGRADS else None
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.learning_rate, consume_grads=True, eps=eps)
    if args.optimizer in ("sgd", "adagrad") and args.mlperf_grad_accum_iter == 1 and args.precision != "fp16":
        for module in model.modules():
            if isinstance(module, BatchedEmbeddingBags) and module.weight.device.type == "cpu":
                module.fuse_optimizer(optimizer)
    return optimizer


def print_debug_arch(model: DLRM_Net, ln_bot, ln_top, sparse_dims=None):
    """The original's --debug-mode architecture lines; `sparse_dims`: the tables' mixed dimensions (--md-flag),
    printed as the original does, else the one embedding dimension."""
    sparse = model.embedding_dim if sparse_dims is None else list(sparse_dims)
    print("model arch:")
    print(f"mlp top arch {len(ln_top) - 1} layers, with input to output dimensions:")
    print(np.array(ln_top))
    print("# of interactions")
    print(ln_top[0])
    options = model.interaction_config.options()
    if options:
        settings = ", ".join(f"{k}={flag_text(v)}" for k, v in options.items())
        print(f"{model.arch_interaction_op} interaction: {settings}")
    print(f"mlp bot arch {len(ln_bot) - 1} layers, with input to output dimensions:")
    print(np.array(ln_bot))
    print("# of features (sparse and dense)")
    print(len(model.table_sizes) + 1)
    print("dense feature size")
    print(ln_bot[0])
    print("sparse feature size")
    print(sparse)
    print(f"# of embeddings (= # of sparse features) {len(model.table_sizes)}, with dimensions {sparse}x:")
    print(np.array(model.table_sizes))


def print_debug_data(dataset, nbatches):
    print("data (inputs and targets):")
    torch.set_printoptions(precision=4)  # as the original, for the rest of the run
    for j in range(nbatches):
        batch = dataset[j]
        print(f"mini-batch: {j}")
        print(batch.dense_x)
        print(batch.sparse.lengths().view(batch.num_tables, batch.global_batch_size).int())  # bag lengths
        print(batch.lS_i)
        print(batch.target)


def print_parameters(model, title):
    """The original's order and shapes: each table, then each MLP weight and bias."""
    print(title)
    for param in model.state_dict().values():
        print((param.float() if param.dtype == torch.bfloat16 else param).detach().cpu().numpy())  # NumPy has no bf16


# ============================================================================ training loop
def log_line(text):
    print(text, flush=True)


def train(args, model, optimizer, train_set, test_set, device, state: TrainState, nbatches: int, log=None,
          run_log: RunLog | None = None):
    """The training loop; returns the final TrainState. Mutates `model` and `optimizer`."""
    log = log or log_line
    run_log = run_log or RunLog()
    guard = DivergenceGuard(args.loss_function, args.optimizer, args.learning_rate, args.loss_weights)
    loss_weights = torch.tensor(args.loss_weights, dtype=torch.float32, device=device)
    accum = args.mlperf_grad_accum_iter
    pin = device.type == "cuda"
    world = ext_dist.world_size()
    # fp16 needs loss scaling; the optimizers take the scale and the inf/NaN flag on the device
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    stop = False
    progress = ProgressBar("training", 0)  # one bar per epoch, on a terminal

    def say(line):  # a printed line, with the progress bar out of its way
        with progress.write_mode():
            log(line)

    def synced_time():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def set_lr(update):
        lr = lr_for_update(update, args.learning_rate, args.lr_num_warmup_steps,
                           args.lr_decay_start_step, args.lr_num_decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

    model.train()
    for epoch in range(state.epoch, args.nepochs):
        first = state.next_batch if epoch == state.epoch else 0
        state.epoch, state.next_batch = epoch, first
        if hasattr(train_set, "set_epoch"):  # datasets reshuffled every epoch
            train_set.set_epoch(epoch)
        # losses stay on the device and are read only when printed: no per-iteration sync
        window_loss = torch.zeros((), device=device, dtype=torch.float64)
        window_samples = window_iters = 0
        # ms/it as the original prints it: the forward, backward and update alone (the time from a batch in hand
        # to its step, summed), or with --mlperf-logging the wall time between iterations (loading included)
        step_times = args.print_time and not args.mlperf_logging
        window_start = synced_time() if args.print_time else 0.0
        window_seconds = 0.0
        window_wall = time.perf_counter()  # samples/s for the run logs, without device syncs
        accum_samples = 0
        run_log.epoch_start(epoch)
        source = dlrm_data.skip_within_batch(train_set, first, state.skip_samples)
        loader = dlrm_data.make_loader(source, first, args.num_workers, pin)
        # with a line per iteration the printed lines are the progress
        progress = ProgressBar(f"training epoch {epoch}", nbatches, first,
                               show=ext_dist.is_rank0() and args.print_freq > 1)
        for j, batch in enumerate(device_batches(loader, device), start=first):
            if j >= nbatches:
                break
            mbs = batch.global_batch_size  # a distributed process holds a share of its rows
            if step_times:
                step_start = synced_time()
            if accum_samples == 0:
                window_first_batch = j
            last_in_window = (j + 1) % accum == 0 or j + 1 == nbatches

            with ext_dist.no_grad_sync(model, not last_in_window):
                with autocast(args.precision, device):
                    z = model_output(model, batch, f"training batch {j + 1} of epoch {epoch}")
                # this process's samples; the sums of all processes make the global batch's
                try:
                    loss_sum = per_sample_loss(args.loss_function, z.float(), batch.target, loss_weights).sum()
                except RuntimeError as e:  # binary_cross_entropy refuses NaN predictions (CPU)
                    if "between 0 and 1" not in str(e):
                        raise
                    raise DLRMError(guard.nan_predictions(j + 1, epoch)) from None

            if accum_samples == 0:
                optimizer.zero_grad(set_to_none=True)
            if last_in_window:  # the update's rate, before the backward: a fused table update happens there
                set_lr(state.updates + 1)
            # the batch mean, or with accumulation the sum, divided by the window's samples at the step,
            # so N micro-batches update exactly as one batch of all their samples. Times the world size:
            # DDP averages MLP gradients over the processes and the embedding exchange divides by it,
            # so both equal the single-process gradient of the global batch.
            scaler.scale(loss_sum * (world / mbs if accum == 1 else world)).backward()
            accum_samples += mbs
            if last_in_window:
                if accum > 1:
                    scale_gradients(model, 1.0 / accum_samples)
                scaler.step(optimizer)
                scaler.update()
                state.updates += 1
                accum_samples = 0
            if step_times:
                window_seconds += synced_time() - step_start

            window_loss += loss_sum.detach()
            window_samples += mbs
            window_iters += 1
            progress.step(mbs, loss_sum, z.shape[0])
            # a checkpoint taken inside an accumulation window resumes at the window's start
            state.next_batch = j + 1 if accum_samples == 0 else window_first_batch
            if state.next_batch != first:
                state.skip_samples = 0

            should_print = (j + 1) % args.print_freq == 0 or j + 1 == nbatches
            should_test = args.test_freq > 0 and ((j + 1) % args.test_freq == 0 or j + 1 == nbatches)
            if should_print or should_test:
                if args.print_time:
                    timed = window_seconds if step_times else synced_time() - window_start
                    ms_per_it = 1000.0 * timed / window_iters
                else:
                    ms_per_it = -1
                state.train_loss = ext_dist.sum_across(window_loss).item() / window_samples
                wall = f" ({time.strftime('%H:%M')})" if args.print_wall_time else ""
                say(f"Finished training it {j + 1}/{nbatches} of epoch {epoch}, {ms_per_it:.2f} ms/it, "
                    f"loss {state.train_loss:.6f}{wall}")
                if not math.isfinite(state.train_loss):  # nothing more to learn: stop
                    bad_input = first_non_finite_input(train_set, j + 1 - window_iters, j)
                    raise DLRMError(guard.non_finite_loss(state.train_loss, j + 1, epoch,
                                                          None if bad_input is None else bad_input + 1))
                warning = guard.check(state.train_loss, j + 1, epoch)
                if warning and ext_dist.is_rank0():
                    with progress.write_mode():
                        print(warning, file=sys.stderr, flush=True)
                seconds = max(time.perf_counter() - window_wall, 1e-9)
                run_log.train_window(dict(
                    epoch=epoch, iteration=j + 1, nbatches=nbatches, global_iteration=epoch * nbatches + j + 1,
                    loss=state.train_loss, samples=window_samples, seconds=seconds,
                    samples_per_second=window_samples / seconds,
                    lr=optimizer.param_groups[0]["lr"]))
                window_loss.zero_()
                window_samples = window_iters = 0
                window_seconds = 0.0
                window_wall = time.perf_counter()

            if should_test:
                stop = run_test(args, model, optimizer, test_set, device, state, nbatches, loss_weights, say,
                                run_log, epoch, j + 1, heading=f"Testing at - {j + 1}/{nbatches} of epoch {epoch},")
                progress.resume()
                if stop:
                    break
            if (should_print or should_test) and args.print_time:
                window_start = synced_time()  # the next ms/it excludes printing and testing
        progress.close()
        run_log.epoch_end(epoch)
        if stop:
            break
        state.next_batch = state.skip_samples = 0
        state.epoch = epoch + 1
    return state


def first_non_finite_input(dataset, first: int, last: int) -> int | None:
    """The first of batches first..last of `dataset` whose dense features are not all finite, else None (also
    for a dataset that cannot be indexed). Read again only after a run diverged, to name the cause."""
    try:
        for k in range(first, last + 1):
            if not bool(torch.isfinite(dataset[k].dense_x).all()):
                return k
    except (TypeError, IndexError, NotImplementedError):
        pass
    return None


def scale_gradients(model, factor):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def run_test(args, model, optimizer, test_set, device, state, nbatches, loss_weights, log,
             run_log: RunLog | None = None, epoch: int = 0, iteration: int = 0, heading: str = "") -> bool:
    """Evaluates, tracks the best metrics, checkpoints on improvement; True when a stop threshold is reached.
    Prints `heading` after the run logs' test start (the original's order of its MLPerf log and that line)."""
    run_log = run_log or RunLog()
    run_log.test_start(epoch, iteration, nbatches)
    if heading:
        log(heading)
    t0 = time.perf_counter()
    metrics = evaluate(model, test_set, args.loss_function, loss_weights, device, args.test_num_workers,
                       args.precision, show_progress=ext_dist.is_rank0(), classification=args.mlperf_logging)
    improved = is_better(metrics, state.best_auc, state.best_acc)
    state.best_acc = max(state.best_acc, metrics.accuracy)
    if not math.isnan(metrics.auc):
        state.best_auc = metrics.auc if math.isnan(state.best_auc) else max(state.best_auc, metrics.auc)
    state.last_test = metrics
    one_class = " (the test set has one class)" if math.isnan(metrics.auc) else ""
    seconds = f", {time.perf_counter() - t0:.2f} s" if args.print_time else ""
    if args.mlperf_logging:  # the original's lines, word for word: scripts parse them
        log(f"recall {metrics.recall:.4f}, precision {metrics.precision:.4f}, f1 {metrics.f1:.4f}, "
            f"ap {metrics.ap:.4f}, auc {format_auc(metrics.auc)}, best auc {format_auc(state.best_auc)}, "
            f"accuracy {metrics.accuracy * 100:3.3f} %, best accuracy {state.best_acc * 100:3.3f} %")
    else:
        log(f" accuracy {metrics.accuracy * 100:3.3f} %, best {state.best_acc * 100:3.3f} %")
    # then ours, as name=value: a parser of the original's "loss <number>" or "auc <number>" does not take them
    log(f" test loss={metrics.loss:.6f}, auc={format_auc(metrics.auc)}{one_class}, "
        f"best auc={format_auc(state.best_auc)}{seconds}")
    run_log.test_end(dict(epoch=epoch, iteration=iteration, nbatches=nbatches,
                          global_iteration=epoch * nbatches + iteration, loss=metrics.loss, accuracy=metrics.accuracy,
                          auc=metrics.auc, best_accuracy=state.best_acc, best_auc=state.best_auc,
                          samples=metrics.samples))
    if improved and args.save_model:
        log(f"Saving model to {args.save_model}")
        save_checkpoint(args.save_model, model, optimizer, state, args, nbatches, len(test_set))
        state.saved = True
    if args.inference_only:  # nothing to stop
        return False
    if args.mlperf_acc_threshold > 0 and state.best_acc >= args.mlperf_acc_threshold:
        log(f"MLPerf testing accuracy threshold {args.mlperf_acc_threshold} reached, stop training")
        return True
    if args.mlperf_auc_threshold > 0 and state.best_auc >= args.mlperf_auc_threshold:
        log(f"MLPerf testing auc threshold {args.mlperf_auc_threshold} reached, stop training")
        return True
    return False


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        signals.restore_interrupt()  # from here on Ctrl-C unwinds (KeyboardInterrupt, below)
        # with loader worker processes, no unwinding: around dying workers it can wait on a dead one
        with signals.sigterm_unwinds(args.num_workers == 0 and args.test_num_workers <= 0), \
                ext_dist.session(args.dist_timeout):  # a lost peer named, the group torn down
            return run(args)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, the shell's status for the signal
        terminated = isinstance(e, signals.Terminated)
        print(f"{flags.program_name('dlrm_s_pytorch.py')}: {'terminated' if terminated else 'interrupted'}",
              file=sys.stderr)
        return signals.exit_status(e)
    except (DLRMError, ext_dist.DistributedError, outputs.OutputError, RunLogError) as e:
        print(f"{flags.program_name('dlrm_s_pytorch.py')}: {ext_dist.error_prefix()}error: {e}", file=sys.stderr)
        if isinstance(e, ext_dist.DistributedError) and ext_dist.is_initialized():
            # a process group whose peer is gone can abort in its destructor at interpreter exit
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1


def run(args) -> int:
    notes = validate_args(args) + fit_workers_to_cpus(args)
    # under torchrun/mpirun: join the process group; only rank 0 prints from here on
    launch = ext_dist.init_distributed(args.dist_backend, args.use_gpu, args.local_rank, args.dist_timeout)
    if ext_dist.world_size() > 1:  # the original's first lines (none with --debug-mode, where it starts no group)
        print(f"Running on {ext_dist.world_size()} ranks using {torch.distributed.get_backend()} backend")
    if not args.debug_mode:
        print(f"world size: {ext_dist.world_size()}, current rank: {ext_dist.rank()}, "
              f"local rank: {launch.local_rank if launch else 0}")
    for note in notes if ext_dist.is_rank0() else []:
        print(note, file=sys.stderr)
    if args.save_onnx:
        try:
            onnx_export.require_onnx()  # before training, not after it
        except onnx_export.ExportError as e:
            raise DLRMError(str(e))
    run_log = open_run_logs(args)
    try:
        try:
            state = train_or_evaluate(args, run_log, launch)
        except BaseException:
            try:
                run_log.run_end("aborted")  # interrupted or stopped: the logs say how the run ended
            except Exception:  # the log itself failing must not hide why the run stopped
                pass
            raise
        run_log.run_end(run_status(args, state))
    finally:
        run_log.close()
    return 0


def open_run_logs(args) -> RunLog:
    """The MLPerf, metrics-log and TensorBoard outputs that the flags ask for (rank 0 writes them)."""
    logs = []
    if not ext_dist.is_rank0():
        return RunLogs(logs)
    try:
        if args.mlperf_logging:
            logs.append(MLPerfLog())
        if args.metrics_log_file:
            logs.append(MetricsLog(args.metrics_log_file, append=bool(args.load_model)))
        if args.tensor_board_filename:
            logs.append(TensorBoardLog(args.tensor_board_filename))
    except RunLogError as e:
        for log in logs:
            log.close()
        raise DLRMError(str(e))
    return RunLogs(logs)


def run_config(args, train_set, test_set, table_sizes) -> dict:
    """What the run logs record at the start; `args` as used, with the table sizes of the data."""
    return {
        # the MLPerf benchmark of this model: DLRM-DCNv2 with the cross network, DLRM otherwise
        "benchmark": "dlrm_dcnv2" if args.arch_interaction_op == "dcn" else "dlrm",
        "seed": args.numpy_rand_seed,
        "global_batch_size": args.mini_batch_size * args.mlperf_grad_accum_iter,
        "gradient_accumulation_steps": args.mlperf_grad_accum_iter,
        "optimizer": args.optimizer,
        "learning_rate": args.learning_rate,
        **({"adagrad_eps": args.adagrad_eps} if args.optimizer in ADAGRADS else {}),
        "warmup_steps": args.lr_num_warmup_steps,
        "decay_start_step": args.lr_decay_start_step,
        "decay_steps": args.lr_num_decay_steps,
        "train_samples": dataset_samples(train_set, args.mini_batch_size),  # an epoch, as the reference
        "eval_samples": dataset_samples(test_set, args.test_mini_batch_size),
        "batches_per_epoch": len(train_set),
        # MLPerf's names of the initialized tensors: all tables together, then each MLP layer (and the
        # interaction's layers: dcn's, projection's)
        "initialized_tensors": ["embeddings"] + [f"bottom_mlp_dense{k}" for k in range(1, len(args.arch_mlp_bot))]
        + interaction_tensors(InteractionConfig.from_args(args))
        + [f"top_mlp_dense{k}" for k in range(1, len(args.arch_mlp_top) + 1)],
        "args": {**{k: v for k, v in vars(args).items() if not k.startswith("_")},
                 "arch_embedding_size": [int(n) for n in table_sizes]},
    }


def original_settings(args, table_sizes) -> dict:
    """The flags as the original's `command line args` JSON holds them: its dash-separated lists as the strings
    it keeps ("13-512-256"), and `ln_emb`, the table sizes; this trainer's own flags after them."""
    original = {flag[2:].replace("-", "_") for flag in flags.ORIGINAL_FLAGS}
    settings = {}
    for dest, value in vars(args).items():
        if dest.startswith("_"):
            continue
        if dest in original and isinstance(value, (list, tuple)):
            value = "-".join(str(v) for v in value)
        settings[dest] = value
    return {**settings, "ln_emb": [int(n) for n in table_sizes]}


def interaction_tensors(config: InteractionConfig) -> list[str]:
    """MLPerf-style names of the interaction's initialized layers: dcn_cross{l} (U_l, V_l, b_l), or
    projection_branch{1,2}_dense{k}; none for dot and cat."""
    if config.name == "dcn":
        return [f"dcn_cross{layer}" for layer in range(1, config.dcn_num_layers + 1)]
    if config.name == "projection":
        branches = (config.interaction_branch1_layer_sizes, config.interaction_branch2_layer_sizes)
        return [f"projection_branch{b}_dense{k}" for b, sizes in enumerate(branches, 1)
                for k in range(1, len(sizes) + 1)]
    return []


def dataset_samples(dataset, batch_size: int) -> int:
    """Samples in a dataset of whole (global) batches."""
    inner = getattr(dataset, "dataset", dataset)  # a distributed process's shard of a dataset
    for attr in ("num_samples", "num_rows"):
        if hasattr(inner, attr):
            return int(getattr(inner, attr))
    return len(dataset) * batch_size


def mixed_dimensions_problem(args, table_sizes) -> str | None:
    """Why --md-flag changes no table of these sizes (each table is QR above --qr-threshold, else MD above
    --md-threshold, as the original), or None."""
    if not args.md_flag:
        return None
    largest = args.qr_threshold if args.qr_flag else math.inf
    if any(args.md_threshold < n <= largest for n in table_sizes):
        return None
    if args.qr_flag and any(n > args.md_threshold for n in table_sizes):
        return (f"the tables with more than --md-threshold={args.md_threshold} rows have more than "
                f"--qr-threshold={args.qr_threshold}: QR tables")
    return f"no table has more than --md-threshold={args.md_threshold} rows"


def run_status(args, state: TrainState) -> str:
    """MLPerf run status: success when a target is reached, or when none applies (none set, or no test during
    training to reach it: the thresholds have no effect then) and the run completed."""
    targets = [(args.mlperf_auc_threshold, state.best_auc), (args.mlperf_acc_threshold, state.best_acc)]
    checked = not args.inference_only and testing(args)
    targets = [(target, best) for target, best in targets if target > 0 and checked]
    if not targets:
        return "success"
    return "success" if any(best >= target for target, best in targets) else "aborted"


def train_or_evaluate(args, run_log: RunLog, launch=None) -> TrainState:
    np.set_printoptions(precision=args.print_precision)
    torch.set_printoptions(precision=args.print_precision)
    torch.manual_seed(args.numpy_rand_seed)
    np.random.seed(args.numpy_rand_seed)
    device = select_device(args.use_gpu, launch.local_rank if launch else 0)
    check_precision(args.precision, device)
    if device.type == "cpu":
        keep_freed_memory()

    if args.data_generation != "dataset":  # sizes given by the flags: checked before any data is made
        check_memory(args, args.arch_mlp_bot[0], args.arch_embedding_size,
                     ext_dist.tables_of_this_process(args.arch_embedding_size, args.arch_sparse_feature_size), device)
    with ext_dist.rank0_first("preparing the data"):  # one process fills any cache, the others reuse it
        train_set, test_set, dense_dim, table_sizes = make_datasets(args)
    nbatches = min(args.num_batches, len(train_set)) if args.num_batches > 0 else len(train_set)
    if args.data_generation == "dataset":  # once the data's table sizes are known
        check_memory(args, dense_dim, table_sizes, ext_dist.tables_of_this_process(table_sizes, args.arch_sparse_feature_size),
                     device)
    if args.mlperf_logging:  # the original's record of the run's settings, which scripts read
        print("command line args: ", json.dumps(original_settings(args, table_sizes), default=str))
    problem = mixed_dimensions_problem(args, table_sizes)
    if problem and ext_dist.is_rank0():
        print(f"note: --md-flag has no effect: {problem}", file=sys.stderr)
    embeddings = None
    if launch:  # this process's tables, pooled for the whole batch and exchanged with the other processes
        embeddings = ext_dist.ModelParallelEmbeddings(
            table_sizes, args.arch_sparse_feature_size, lambda tables: build_embeddings(args, table_sizes, tables))
    model = build_model(args, dense_dim, table_sizes, embeddings)
    if args.debug_mode:
        ln_top = [model.top_l[0].in_features] + list(args.arch_mlp_top)
        md_dims = md_solver(table_sizes, args.md_temperature, args.arch_sparse_feature_size,
                            args.md_round_dims) if args.md_flag else None
        print_debug_arch(model, args.arch_mlp_bot, ln_top, md_dims)
        print_debug_data(train_set, nbatches)
        print_parameters(model, "initial parameters (weights and bias):")
    model.to(device)
    if args.compile:
        compile_dense(model, device)
    if launch:  # this process's share of each batch; MLPs replicated
        model, train_set, test_set = ext_dist.distribute(model, train_set, test_set, device,
                                                         lambda: build_model(args, dense_dim, table_sizes))
    optimizer = None if args.inference_only else build_optimizer(args, model)
    if device.type == "cpu" and not kernels.native() and ext_dist.is_rank0():
        print(f"note: {kernels.status()}; the lookups, SGD's and Adagrad's table updates and the dot interaction "
              "run as PyTorch operators, the tables' initial values as NumPy's, slower", file=sys.stderr)

    order = data_order(args, train_set)
    state = TrainState(batch_size=args.mini_batch_size, data_order=order)
    if args.load_model:
        print(f"Loading saved model {args.load_model}")
        saved = {}  # the saving run's counts, filled before `check` runs
        check = None if args.inference_only else lambda state: check_data_order(  # at the end of an epoch only if
            state, order, args.load_model,  # it has as many batches in this run (--num-batches can shorten one)
            epoch_batches=saved.get("nbatches") if saved.get("nbatches") == nbatches else None)
        state = load_checkpoint(args.load_model, model, optimizer, check, saved)
        state.saved = False  # whether *this* run saved: if it does not, the final model is saved
        if not args.inference_only:
            state = resume_position(state, args, order, args.load_model)
        last = state.last_test
        saved_epoch, saved_batch = original_position(state, saved.get("nbatches", nbatches))
        print(f"Saved at: epoch = {saved_epoch:d}/{saved.get('nepochs', args.nepochs):d}, batch = "
              f"{saved_batch:d}/{saved.get('nbatches', nbatches):d}, "
              f"ntbatch = {saved.get('nbatches_test', len(test_set)):d}")  # the saving run's counts
        print(f"Training state: loss = {state.train_loss:.6f}")
        accuracy = last.accuracy if last is not None else 0.0  # the original's lines, as it prints them
        auc = f", auc = {last.auc if last is not None else float('nan'):.3f}" if args.mlperf_logging else ""
        print(f"Testing state: accuracy = {accuracy * 100:3.3f} %{auc}")
        if not args.inference_only and (state.epoch, state.next_batch) >= (args.nepochs - 1, nbatches):
            print(f"note: --load-model {args.load_model} is at epoch {state.epoch}, batch {state.next_batch}: with "
                  f"--nepochs={args.nepochs} of {nbatches} batches there is nothing left to train (a larger "
                  "--nepochs goes on)", file=sys.stderr)

    run_log.run_start(run_config(args, train_set, test_set, table_sizes))
    loss_weights = torch.tensor(args.loss_weights, dtype=torch.float32, device=device)
    exported_model = model
    # without --profiling-trace-file the processes of a run stamp their files with the same (rank 0's) time
    stamp = ext_dist.rank0_value(datetime.datetime.now()) if args.enable_profiling else None
    with profiling.profiled(args.enable_profiling, args.profiling_trace_file, device.type == "cuda",
                            rank=profiling_rank(), now=stamp):
        if args.inference_only:
            if args.save_onnx and (args.quantize_mlp_with_bit != 32 or args.quantize_emb_with_bit != 32):
                exported_model = copy.deepcopy(model)  # ONNX gets the fp32 model
            model = quantize_if_asked(args, model)
            state = TrainState()
            print("time/loss/accuracy (if enabled):")
            print("Testing for inference only")  # as the original: the test set alone
            run_test(args, model, None, test_set, device, state, nbatches, loss_weights, log_line, run_log)
        else:
            print("time/loss/accuracy (if enabled):")
            state = train(args, model, optimizer, train_set, test_set, device, state, nbatches, run_log=run_log)
            # the final model when no test ran or none improved; but not over the better model it was loaded from
            keeps_loaded = bool(args.load_model) and testing(args) and os.path.exists(args.save_model) and \
                os.path.samefile(args.save_model, args.load_model)
            if args.save_model and not state.saved and not keeps_loaded:
                print(f"Saving model to {args.save_model}")
                save_checkpoint(args.save_model, model, optimizer, state, args, nbatches, len(test_set))
            elif args.save_model and not state.saved:
                print(f"note: no test of this run improved on the loaded checkpoint's best; {args.save_model} (the "
                      "loaded checkpoint) was not written", file=sys.stderr)
    if args.debug_mode and not args.inference_only:
        print_parameters(model, "updated parameters (weights and bias):")
    if args.plot_compute_graph:
        plot_compute_graph(args, model, train_set[0].to(device), loss_weights)
    if args.save_onnx:
        save_onnx(exported_model, train_set[0], args.onnx_file)
    return state


def quantize_if_asked(args, model):
    mlp_bits, emb_bits = args.quantize_mlp_with_bit, args.quantize_emb_with_bit
    if mlp_bits == 32 and emb_bits == 32:
        return model
    before = quantization.serialized_size(model)
    model = quantization.quantize_for_inference(model, mlp_bits, emb_bits)
    after = quantization.serialized_size(model)
    mlp = {8: "int8 (dynamic)", 16: "fp16", 32: "fp32"}[mlp_bits]
    print(f"Quantized for CPU inference: MLPs {mlp}, embedding rows {emb_bits}-bit; "
          f"model size {before / 2**20:.3f} MiB -> {after / 2**20:.3f} MiB")
    return model


def plot_compute_graph(args, model, batch, loss_weights):
    """Writes the autograd graph of one forward pass (and its loss when training), under the run's
    --precision as training runs it (bf16/fp16: its casts are in the graph)."""
    with torch.enable_grad():
        with autocast(args.precision, batch.dense_x.device):
            z = model(batch.dense_x, batch.sparse)
        if args.inference_only:
            output = z.mean()
        else:
            output = per_sample_loss(args.loss_function, z.float(), batch.target, loss_weights).mean()
    compute_graph.write_compute_graph(output, dict(model.named_parameters()), args.compute_graph_file)


def save_onnx(model, batch, path):
    try:
        with eager_dense(model):  # --compile: the module's own forward is traced
            difference = onnx_export.export_onnx(model, batch, path)
    except onnx_export.ExportError as e:
        raise DLRMError(str(e))
    except OSError as e:
        raise DLRMError(f"--onnx-file {path}: cannot write the ONNX model ({e.strerror or e})")
    print(f"Saved the ONNX model to {path} (onnx.checker passed; max |onnx - torch| = {difference:.2e} "
          f"on a batch of {batch.batch_size})")


if __name__ == "__main__":
    sys.exit(main())
