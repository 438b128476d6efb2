"""Feature interactions: how DLRM combines the bottom-MLP output with the pooled embeddings.

An interaction is an `nn.Module` called as interaction(x, ly) with
    x:  [B, D_dense] bottom-MLP output,
    ly: [B, T, D] pooled embeddings,
returning [B, W], the input of the top MLP. Each is registered by name in `INTERACTIONS`
(the values of --arch-interaction-op) and says, before any model is built, how wide its
output is (`output_width`), which widths it cannot work with (`check_dims`) and which options
(`check_options`):

- `dot` (Naumov et al. 2019, arXiv:1906.00091): x followed by the dot products of every pair
  of the T + 1 feature vectors (x and each table's), i > j, or i >= j with `itself`;
- `cat`: x followed by all pooled embeddings, flattened;
- `dcn` (DCN V2, Wang et al. 2021, arXiv:2008.13535, the MLPerf DLRMv2 model): the low-rank
  cross network over x0 = [x, ly flattened]: x_{l+1} = x0 * (U_l (V_l x_l) + b_l) + x_l,
  L layers of rank r; output x_L, as wide as x0;
- `projection` (TorchRec's DLRM_Projection): two MLP branches over x0 whose outputs, reshaped to
  [B, F1, D] and [B, D, F2], are multiplied: x followed by the F1 * F2 products.

The options of an interaction (the dot's `itself`, the cross network's layers and rank, the
projection's branch widths) travel together as one `InteractionConfig`, built from the flags
(`InteractionConfig.from_args`) or from DLRM_Net's keywords. A new interaction is one class here
and one entry in `INTERACTIONS`.

    >>> interaction = InteractionConfig("dot").build(num_tables=3, dense_dim=4, emb_dim=4)
    >>> interaction(torch.ones(2, 4), torch.ones(2, 3, 4)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from dlrmkit import kernels

# the reference's defaults (TorchRec dlrm_main.py): 3 cross layers of rank 512; branches 2048-2048
DCN_NUM_LAYERS = 3
DCN_LOW_RANK_DIM = 512
BRANCH_LAYER_SIZES = (2048, 2048)


@dataclasses.dataclass(frozen=True)
class InteractionConfig:
    """Which interaction (`name`, a key of INTERACTIONS) and its options; the options' names are
    those of the trainer's flags and of DLRM_Net's keywords.

    itself: the dot interaction also pairs each feature with itself (--arch-interaction-itself);
    dcn_num_layers, dcn_low_rank_dim: the cross network's layers L (>= 1) and rank r (>= 1);
    interaction_branch1_layer_sizes, interaction_branch2_layer_sizes: the projection's branch MLP
    widths after their input, each ending in a multiple of the embedding dimension.
    Options of other interactions are kept but have no effect.
    """

    name: str = "dot"
    itself: bool = False
    dcn_num_layers: int = DCN_NUM_LAYERS
    dcn_low_rank_dim: int = DCN_LOW_RANK_DIM
    interaction_branch1_layer_sizes: tuple = BRANCH_LAYER_SIZES
    interaction_branch2_layer_sizes: tuple = BRANCH_LAYER_SIZES

    def __post_init__(self):  # plain values, whatever came in (NumPy numbers, lists)
        for field, kind in (("itself", bool), ("dcn_num_layers", int), ("dcn_low_rank_dim", int)):
            object.__setattr__(self, field, kind(getattr(self, field)))
        for field in ("interaction_branch1_layer_sizes", "interaction_branch2_layer_sizes"):
            object.__setattr__(self, field, tuple(int(n) for n in getattr(self, field)))

    @classmethod
    def from_args(cls, args) -> "InteractionConfig":
        """The interaction the trainer's flags describe (--arch-interaction-op and its options)."""
        options = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)[2:]}
        return cls(args.arch_interaction_op, args.arch_interaction_itself, **options)

    @property
    def interaction_class(self) -> type["Interaction"]:
        return interaction_class(self.name)

    def options(self) -> dict:
        """{flag: value} of the options that shape this interaction (what a checkpoint records);
        the dot interaction's `itself` is recorded on its own (checkpoints have always had it)."""
        return self.interaction_class.options(self)

    def check_options(self, emb_dim: int) -> str | None:
        """Why these options cannot work with embeddings `emb_dim` wide (a sentence naming the flag),
        or None when they can."""
        return self.interaction_class.check_options(emb_dim, self)

    def output_width(self, num_tables: int, dense_dim: int, emb_dim: int) -> int:
        """Width of the output, i.e. the input width the top MLP must have."""
        return self.interaction_class.output_width(num_tables, dense_dim, emb_dim, self)

    def dense_layers(self, num_tables: int, dense_dim: int, emb_dim: int) -> list[list[int]]:
        """The interaction's own linear layers, as MLP widths (input first), for memory estimates."""
        return self.interaction_class.dense_layers(num_tables, dense_dim, emb_dim, self)

    def build(self, num_tables: int, dense_dim: int, emb_dim: int) -> "Interaction":
        """The interaction module; ValueError when `check_dims` or `check_options` finds a problem."""
        problem = self.interaction_class.check_dims(dense_dim, emb_dim) or self.check_options(emb_dim)
        if problem:
            raise ValueError(problem)
        return self.interaction_class(num_tables, dense_dim, emb_dim, self)


class Interaction(nn.Module):
    """Base of the interactions; see the module docstring. Built as cls(num_tables, dense_dim,
    emb_dim, config) after `check_dims` and `check_options` found no problem."""

    def __init__(self, num_tables: int, dense_dim: int, emb_dim: int, config: InteractionConfig):
        super().__init__()
        self.num_tables = int(num_tables)
        self.dense_dim = int(dense_dim)
        self.emb_dim = int(emb_dim)
        self.itself = config.itself

    @staticmethod
    def output_width(num_tables: int, dense_dim: int, emb_dim: int, config: InteractionConfig) -> int:
        raise NotImplementedError

    @staticmethod
    def check_dims(dense_dim: int, emb_dim: int) -> str | None:
        """Why a bottom MLP ending in `dense_dim` and embeddings `emb_dim` wide cannot interact (a
        sentence), or None when they can."""
        return None

    @staticmethod
    def check_options(emb_dim: int, config: InteractionConfig) -> str | None:
        """Why the config's options cannot work (a sentence naming the flag), or None when they can."""
        return None

    @staticmethod
    def options(config: InteractionConfig) -> dict:
        """{flag: value} of the config's options that this interaction uses."""
        return {}

    def top_input(self, x: torch.Tensor, ly: torch.Tensor, autocast_layer: bool = False) -> torch.Tensor:
        """The output as the top MLP reads it. `autocast_layer`: it goes straight into a layer running under
        autocast (the top MLP's first Linear), which casts it to the autocast dtype: an interaction may hand it
        over in that dtype already, with the values the cast would give. By default the module's output."""
        return self(x, ly)

    @staticmethod
    def dense_layers(num_tables: int, dense_dim: int, emb_dim: int, config: InteractionConfig) -> list[list[int]]:
        return []


def gram_pairs(features: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
    """The dot products of the feature vectors [B, F, D] at `pair_index` (positions in the flattened
    [F, F] Gram matrix), [B, P], in float32 also under autocast."""
    if torch.is_autocast_enabled(features.device.type):
        with torch.autocast(features.device.type, enabled=False):
            return gram_pairs(features, pair_index)
    features = features.float()
    return torch.bmm(features, features.transpose(1, 2)).flatten(1).index_select(1, pair_index)


class GramPairs(torch.autograd.Function):
    """`gram_pairs` with a backward that uses the Gram matrix's symmetry.

    The pairs' gradient g [B, P] is gathered into the symmetric [F, F] matrix S with g at (i, j)
    and (j, i) (2g at a self-pair (i, i): d(f.f)/df = 2f) by one column gather of [g, 0, 2g_self]
    at `gather_index` (no scatter), and the features' gradient is S @ features: one bmm, where
    autograd through bmm(f, f^T) runs two and adds them.
    """

    generate_vmap_rule = True  # torch.func transforms (grad, vmap) see its forward and backward as operators

    @staticmethod
    def forward(features, pair_index, gather_index, self_pairs):
        return gram_pairs(features, pair_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        features, _, gather_index, self_pairs = inputs
        ctx.save_for_backward(features, gather_index, self_pairs)

    @staticmethod
    def backward(ctx, grad_pairs):
        features, gather_index, self_pairs = ctx.saved_tensors
        return gram_pairs_backward(features, grad_pairs, gather_index, self_pairs).to(features.dtype), None, None, None


def gram_pairs_backward(features, grad_pairs, gather_index, self_pairs):
    """The gradient [B, F, D] float32 of `gram_pairs(features, ...)` given the pairs' gradient [B, P]: S @ features,
    S the symmetric [F, F] matrix gathered from [g, 0, 2 g_self] at `gather_index` (see GramPairs). Made of
    differentiable operators (a backward through it can be differentiated again)."""
    batch, num_features, _ = features.shape
    grad_pairs = grad_pairs.float()
    parts = [grad_pairs, grad_pairs.new_zeros(batch, 1)]
    if self_pairs.numel():
        parts.append(grad_pairs.index_select(1, self_pairs) * 2)
    sym = torch.cat(parts, dim=1).index_select(1, gather_index)
    return torch.bmm(sym.view(batch, num_features, num_features), features.float())


class NativeDotInteraction(torch.autograd.Function):
    """The dot interaction's output [x, pairs] from the native kernels (`kernels.dot_interaction`), forward
    and backward, in float32 (the output rounded to `out_dtype`, float32 or bfloat16; its gradient widened to
    float32): no [B, F, F] Gram matrix, no gathers, no concatenations. Called only where
    `kernels.dot_interaction_runs`; a backward that is to be differentiated again runs PyTorch's operators."""

    @staticmethod
    def forward(ctx, x, ly, interaction, out_dtype):
        ctx.save_for_backward(x, ly)
        ctx.interaction = interaction
        return kernels.dot_interaction(x, ly, interaction.itself, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, ly = ctx.saved_tensors
        if not torch.is_grad_enabled():
            native = kernels.dot_interaction_backward(x, ly, grad_out.contiguous(), ctx.interaction.itself)
            if native is not None:
                return (*native, None, None)
        # PyTorch operators: a backward to be differentiated again (create_graph), or a gradient the kernels do not take
        grad_out = grad_out.float()
        dim, interaction = x.shape[1], ctx.interaction
        features = torch.cat([x.unsqueeze(1), ly], dim=1)
        grad = gram_pairs_backward(features, grad_out[:, dim:], interaction.gather_index, interaction.self_pairs)
        return grad_out[:, :dim] + grad[:, 0], grad[:, 1:], None, None


class DotInteraction(Interaction):
    """x, then the pairwise dot products of [x, ly_1, ..., ly_T] in the original's order, in float32."""

    def __init__(self, num_tables, dense_dim, emb_dim, config):
        super().__init__(num_tables, dense_dim, emb_dim, config)
        # pairs (i, j), i > j (or i >= j with self-interaction), in the original's row-major order,
        # as positions in the flattened [F, F] Gram matrix: one index_select per forward; (j, i) for the backward
        num_features = self.num_tables + 1
        rows, cols = torch.tril_indices(num_features, num_features, offset=0 if self.itself else -1)
        self.register_buffer("pair_index", rows * num_features + cols, persistent=False)
        # the backward's gather: Gram position -> its pair's column of [g, 0, 2 g_self] (P: the zero);
        # from Python integers (the same row-major pairs), so that a model built on the meta device gets them too
        pairs = [(i, j) for i in range(num_features) for j in range(i + 1 if self.itself else i)]
        gather = [len(pairs)] * (num_features * num_features)
        for p, (i, j) in enumerate(pairs):
            gather[i * num_features + j] = gather[j * num_features + i] = p
        self_pairs = [p for p, (i, j) in enumerate(pairs) if i == j]
        for k, p in enumerate(self_pairs):
            i = pairs[p][0]
            gather[i * num_features + i] = len(pairs) + 1 + k
        self.register_buffer("gather_index", torch.tensor(gather, dtype=torch.int64), persistent=False)
        self.register_buffer("self_pairs", torch.tensor(self_pairs, dtype=torch.int64), persistent=False)

    @staticmethod
    def output_width(num_tables, dense_dim, emb_dim, config):
        num_features = num_tables + 1
        pairs = num_features * (num_features + 1) // 2 if config.itself else num_features * (num_features - 1) // 2
        return dense_dim + pairs

    @staticmethod
    def check_dims(dense_dim, emb_dim):
        if dense_dim != emb_dim:
            return "the dot interaction needs them equal"
        return None

    def top_input(self, x, ly, autocast_layer=False):
        return self(x, ly, autocast_layer=autocast_layer)

    def forward(self, x, ly, autocast_layer=False):
        """[B, W] float32, under autocast too (tiny products, where bf16 only adds casts and rounding); with
        `autocast_layer` (see `top_input`) on the CPU under bf16 autocast where the native kernels run, the
        float32 results rounded to bfloat16 as the kernel writes them (one pass over the output less each way)."""
        x, ly = x.float(), ly.float()
        if (x.device.type == "cpu" and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
                and kernels.dot_interaction_runs(x, ly)):
            bf16 = (autocast_layer and torch.is_autocast_enabled("cpu")
                    and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return NativeDotInteraction.apply(x, ly, self, torch.bfloat16 if bf16 else torch.float32)
        features = torch.cat([x.unsqueeze(1), ly], dim=1)  # [B, T+1, D]
        if torch.is_grad_enabled() and features.requires_grad:
            pairs = GramPairs.apply(features, self.pair_index, self.gather_index, self.self_pairs)
        else:  # the same arithmetic as plain operators (ONNX export, tracing, inference)
            pairs = gram_pairs(features, self.pair_index)
        return torch.cat([x, pairs], dim=1)


class CatInteraction(Interaction):
    """x, then every pooled embedding: [x, ly_1, ..., ly_T] flattened."""

    @staticmethod
    def output_width(num_tables, dense_dim, emb_dim, config):
        return dense_dim + num_tables * emb_dim

    def forward(self, x, ly):
        return torch.cat([x, ly.to(x.dtype).flatten(1)], dim=1)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """t in float32 when it is in a narrower float type (under autocast), else t (float32 or float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def flat_features(x: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """x0 = [x, ly_1, ..., ly_T]: [B, D_dense + T * D], in float32 also under autocast."""
    x, ly = at_least_float32(x), at_least_float32(ly)
    return torch.cat([x, ly.to(x.dtype).flatten(1)], dim=1)


class CrossLayer(nn.Module):
    """One low-rank cross layer: x0 * (U (V x) + b) + x, over [B, N] inputs.

    `down` is V (a bias-free Linear N -> r, weight [r, N]), `up` is U with the bias b (Linear
    r -> N, weight [N, r]). U and V ~ Xavier normal N(0, 2 / (N + r)) and b = 0, as TorchRec's
    LowRankCrossNet (the MLPerf DLRMv2 reference). Under autocast the two products run in its dtype;
    the residual sum stays float32.
    """

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=True)
        with torch.no_grad():
            nn.init.xavier_normal_(self.down.weight)
            nn.init.xavier_normal_(self.up.weight)
            self.up.bias.zero_()

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.up(self.down(x)).to(x0.dtype) + x


class DCNInteraction(Interaction):
    """The DCN V2 low-rank cross network (Wang et al. 2021, arXiv:2008.13535) over
    x0 = [x, ly_1, ..., ly_T] (N = D_dense + T * D wide):

        x_{l+1} = x0 * (U_l (V_l x_l) + b_l) + x_l,   l = 0 .. L-1,   U_l: [N, r], V_l: [r, N]

    returning x_L [B, N] (float32), the input of the top MLP, as TorchRec's DLRM_DCN
    (--dcn-num-layers L, --dcn-low-rank-dim r). The dense width need not equal D.
    """

    def __init__(self, num_tables, dense_dim, emb_dim, config):
        super().__init__(num_tables, dense_dim, emb_dim, config)
        width = self.dense_dim + self.num_tables * self.emb_dim
        self.layers = nn.ModuleList(CrossLayer(width, config.dcn_low_rank_dim) for _ in range(config.dcn_num_layers))

    @staticmethod
    def output_width(num_tables, dense_dim, emb_dim, config):
        return dense_dim + num_tables * emb_dim

    @staticmethod
    def check_options(emb_dim, config):
        if config.dcn_num_layers < 1:
            return f"--dcn-num-layers {config.dcn_num_layers}: the cross network needs at least 1 layer"
        if config.dcn_low_rank_dim < 1:
            return f"--dcn-low-rank-dim {config.dcn_low_rank_dim}: the rank must be at least 1"
        return None

    @staticmethod
    def options(config):
        return {"--dcn-num-layers": config.dcn_num_layers, "--dcn-low-rank-dim": config.dcn_low_rank_dim}

    @staticmethod
    def dense_layers(num_tables, dense_dim, emb_dim, config):
        width = dense_dim + num_tables * emb_dim
        return [[width, config.dcn_low_rank_dim, width]] * config.dcn_num_layers

    def forward(self, x, ly):
        x0 = flat_features(x, ly)
        xl = x0
        for layer in self.layers:
            xl = layer(x0, xl)
        return xl


def branch_mlp(widths) -> nn.Sequential:
    """Linear layers widths[0] -> widths[1] -> ..., each followed by ReLU, with nn.Linear's default
    initialisation: TorchRec's MLP, the projection's branches."""
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(int(fan_in), int(fan_out)), nn.ReLU()]
    return nn.Sequential(*layers)


class ProjectionInteraction(Interaction):
    """TorchRec's projection interaction (InteractionProjectionArch of DLRM_Projection): two branch
    MLPs over x0 = [x, ly_1, ..., ly_T] (N = D_dense + T * D wide), with ReLU after every layer,
    ending in F1 * D and F2 * D units; their outputs reshaped to Y [B, F1, D] and Z [B, D, F2]
    give the products Y Z [B, F1, F2]. Returns [x, (Y Z) flattened]: [B, D_dense + F1 * F2]
    (--interaction-branch1-layer-sizes, --interaction-branch2-layer-sizes: the widths after N).
    """

    def __init__(self, num_tables, dense_dim, emb_dim, config):
        super().__init__(num_tables, dense_dim, emb_dim, config)
        width = self.dense_dim + self.num_tables * self.emb_dim
        self.branch1 = branch_mlp([width, *config.interaction_branch1_layer_sizes])
        self.branch2 = branch_mlp([width, *config.interaction_branch2_layer_sizes])

    @staticmethod
    def output_width(num_tables, dense_dim, emb_dim, config):
        f1 = config.interaction_branch1_layer_sizes[-1] // emb_dim
        f2 = config.interaction_branch2_layer_sizes[-1] // emb_dim
        return dense_dim + f1 * f2

    @staticmethod
    def check_options(emb_dim, config):
        for k, sizes in enumerate((config.interaction_branch1_layer_sizes, config.interaction_branch2_layer_sizes), 1):
            if not sizes or min(sizes) < 1:
                return f"--interaction-branch{k}-layer-sizes must list widths of at least 1"
            if sizes[-1] % emb_dim:
                return (f"--interaction-branch{k}-layer-sizes ends in {sizes[-1]}, not a multiple of the embedding "
                        f"dimension {emb_dim} (the branch's output is split into vectors of that width)")
        return None

    @staticmethod
    def options(config):
        return {"--interaction-branch1-layer-sizes": list(config.interaction_branch1_layer_sizes),
                "--interaction-branch2-layer-sizes": list(config.interaction_branch2_layer_sizes)}

    @staticmethod
    def dense_layers(num_tables, dense_dim, emb_dim, config):
        width = dense_dim + num_tables * emb_dim
        return [[width, *config.interaction_branch1_layer_sizes],
                [width, *config.interaction_branch2_layer_sizes]]

    def forward(self, x, ly):
        x0 = flat_features(x, ly)
        batch = x0.shape[0]
        y = self.branch1(x0).to(x0.dtype).reshape(batch, -1, self.emb_dim)  # [B, F1, D]
        z = self.branch2(x0).to(x0.dtype).reshape(batch, self.emb_dim, -1)  # [B, D, F2]
        with torch.autocast(x0.device.type, enabled=False):  # the products in float32
            products = torch.bmm(y, z)
        return torch.cat([x.to(x0.dtype), products.flatten(1)], dim=1)


INTERACTIONS = {"dot": DotInteraction, "cat": CatInteraction, "dcn": DCNInteraction,
                "projection": ProjectionInteraction}


def interaction_class(name: str) -> type[Interaction]:
    """The interaction registered as `name`; ValueError naming the choices otherwise."""
    if name not in INTERACTIONS:
        raise ValueError(f"--arch-interaction-op={name} is not supported ({', '.join(INTERACTIONS)})")
    return INTERACTIONS[name]


def interaction_width(name: str, itself: bool, num_tables: int, dense_dim: int, emb_dim: int, **options) -> int:
    """Width of the interaction's output, i.e. the input width the top MLP must have;
    `options`: InteractionConfig's fields (dcn_num_layers, interaction_branch1_layer_sizes, ...)."""
    return InteractionConfig(name, itself, **options).output_width(num_tables, dense_dim, emb_dim)
