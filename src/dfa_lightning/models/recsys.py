"""Click-through-rate models of the DFA paper's recommender-system experiments.

Paper: Launay et al. 2020, "Direct Feedback Alignment Scales to Modern Deep Learning Tasks and Architectures"
(https://arxiv.org/abs/2006.12878), Table 2 on Criteo. Reference code: torchfm 0.7 (rixwew/pytorch-fm) and
lightonai/dfa-scales-to-modern-deep-learning ``paper-experiments/recommender-systems/dfa_models.py``; the default
sizes are the ones of its ``recsys.py``. No torchfm dependency: the blocks below are small rewrites.

Contract shared by every model:

* input ``x``: LongTensor ``[B, F]`` of GLOBAL indices into one table of ``sum(field_dims)`` rows (the per-field
  offsets are already added by :class:`~dfa_lightning.data.criteo.CriteoDataModule`; F = 39 for Criteo);
* output: the click LOGIT, shape ``[B]`` (no sigmoid: the DFA error is taken at the logit);
* deferred building: ``field_dims`` is only known once the data is preprocessed, so it may be ``None`` at
  construction. Every module except the embedding tables exists right away (so feedback-point patterns resolve);
  ``build(field_dims=...)`` (what ``datamodule.model_hints()`` returns) creates the tables. ``build`` is idempotent,
  and loading a checkpoint into an unbuilt model builds the tables from the checkpoint's shapes.

Feedback points: :data:`FEEDBACK_POINTS` lists, per model, the ``named_modules()`` globs of the places where the
reference code puts its DFA layers, in the project's glob syntax (:func:`dfa_lightning.feedback.points.glob_match`:
``*`` stays inside one name, so ``mlp.*`` is the blocks ``mlp.0``, ``mlp.1``... and not the layers ``mlp.0.0``
inside them). Each matched module outputs one Tensor whose first dim is the batch. FM has no hidden layer and is
trained with backprop only in the paper.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfa_lightning.errors import ConfigError

FEEDBACK_POINTS: dict[str, list[str]] = {
    "fm": [],
    # DFA layers after the 3 MLP blocks; the embeddings learn through the FM part only (see detach_mlp_input).
    "deepfm": ["mlp.*"],
    # Embedding, cross-layer outputs, the 2 MLP blocks and the [cross, deep] concatenation. (The reference code
    # skips the last cross layer, whose output is part of `stack` anyway.)
    "deepcross": ["embedding", "cross.layers.*", "mlp.*", "stack"],
    # Embedding, its projection, the attention layers, the flattened interaction output and the 3 MLP blocks.
    # (The reference code skips the last attention layer, which feeds `attn_out` anyway.)
    "autoint": ["embedding", "attn_embedding", "attention.*", "attn_out", "mlp.*"],
    # The logarithmic-neuron layer output and the 3 MLP blocks.
    "afn": ["lnn", "mlp.*"],
}


class FeaturesEmbedding(nn.Module):
    """One embedding table for all fields, created by :meth:`build` once its size is known.

    Shapes: ``x [B, F]`` (global indices) -> ``[B, F, dim]``. ``init="xavier"`` (torchfm embeddings) or ``"normal"``
    (``nn.Embedding``'s N(0, 1), torchfm's linear term).
    """

    def __init__(self, dim: int, num_embeddings: int | None = None, init: str = "xavier") -> None:
        super().__init__()
        self.dim, self.init = dim, init
        self.register_parameter("weight", None)
        if num_embeddings is not None:
            self.build(num_embeddings)

    def build(self, num_embeddings: int, device: torch.device | None = None) -> None:
        if self.weight is not None:
            if self.weight.shape[0] != num_embeddings:
                raise ConfigError(f"embedding already built with {self.weight.shape[0]} rows, asked for "
                                  f"{num_embeddings}: field_dims differ (other data or min_threshold?)")
            return
        weight = torch.empty(num_embeddings, self.dim, device=device)
        if self.init == "xavier":
            nn.init.xavier_uniform_(weight)
        else:
            nn.init.normal_(weight)
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise ConfigError("CTR model used before build(field_dims=...): call "
                              "model.build(**datamodule.model_hints()) first")
        return F.embedding(x, self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # build from the checkpoint's shape
        if self.weight is None and prefix + "weight" in state_dict:
            self.build(state_dict[prefix + "weight"].shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{'unbuilt' if self.weight is None else self.weight.shape[0]}, {self.dim}"


class FeaturesLinear(nn.Module):
    """First-order term: one scalar weight per category, summed over the fields, plus a bias. ``[B, F] -> [B, 1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = FeaturesEmbedding(1, init="normal")
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).sum(dim=1) + self.bias


class FactorizationMachine(nn.Module):
    """Pairwise interactions ``sum_{i<j} <e_i, e_j>`` in O(F·E). ``[B, F, E] -> [B, 1]``."""

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return 0.5 * (e.sum(dim=1).pow(2) - e.pow(2).sum(dim=1)).sum(dim=1, keepdim=True)


def mlp(in_dim: int, dims: Sequence[int], dropout: float) -> nn.Sequential:
    """Blocks ``Linear -> BatchNorm1d -> ReLU -> Dropout`` (torchfm); block ``i`` is module ``mlp.i`` and outputs its
    post-dropout activation, the paper's feedback point. ``[B, in_dim] -> [B, dims[-1]]``."""
    blocks = []
    for dim in dims:
        blocks.append(nn.Sequential(nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Dropout(dropout)))
        in_dim = dim
    return nn.Sequential(*blocks)


class CrossLayer(nn.Module):
    """``x_{l+1} = x0 * (x_l · w) + b + x_l`` (Deep & Cross). ``([B, D], [B, D]) -> [B, D]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Linear(dim, 1, bias=False)
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(x) + self.b + x


class CrossNetwork(nn.Module):
    """Stack of :class:`CrossLayer` (``cross.layers.i``). ``[B, D] -> [B, D]``."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(dim) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class Concat(nn.Module):
    """``torch.cat(tensors, dim=1)`` as a module, so the concatenation can be a feedback point."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.cat(tensors, dim=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the fields, returning a plain Tensor (not MHA's tuple).

    Shapes: ``[B, F, D] -> [B, F, D]``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class ReluFlatten(nn.Module):
    """``relu(x).flatten(1)``: AutoInt's interaction output. ``[B, F, D] -> [B, F·D]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).flatten(1)


class LNN(nn.Module):
    """Logarithmic neurons of AFN: ``relu(expm1(W @ log1p(|e| + 1e-7)))``, W: ``[lnn_dim, F]``.

    Shapes: ``[B, F, E] -> [B, lnn_dim·E]``.
    """

    def __init__(self, num_fields: int, embed_dim: int, lnn_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(lnn_dim, num_fields).uniform_(-1 / math.sqrt(num_fields),
                                                                             1 / math.sqrt(num_fields)))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return F.relu(torch.expm1(torch.matmul(self.weight, torch.log1p(e.abs() + 1e-7)))).flatten(1)


class CTRModel(nn.Module):
    """Base class: deferred building of the embedding tables (see module docstring)."""

    name = ""

    def __init__(self, field_dims: Sequence[int] | None, num_fields: int) -> None:
        super().__init__()
        self.field_dims = list(field_dims) if field_dims is not None else None
        self.num_fields = len(field_dims) if field_dims is not None else num_fields

    @property
    def feedback_points(self) -> list[str]:
        """``named_modules()`` glob patterns of the paper's DFA feedback points for this model."""
        return list(FEEDBACK_POINTS[self.name])

    def tables(self) -> list[FeaturesEmbedding]:
        return [m for m in self.modules() if isinstance(m, FeaturesEmbedding)]

    @property
    def built(self) -> bool:
        return all(t.weight is not None for t in self.tables())

    def build(self, field_dims: Sequence[int] | None = None, **unused) -> None:
        """Create the embedding tables for ``field_dims`` (categories per field). No-op when already built."""
        field_dims = list(field_dims) if field_dims is not None else self.field_dims
        if field_dims is None:
            if self.built:
                return
            raise ConfigError(f"{type(self).__name__} needs field_dims: pass field_dims= or call "
                              "model.build(**datamodule.model_hints())")
        if len(field_dims) != self.num_fields:
            raise ConfigError(f"{type(self).__name__} was set up for {self.num_fields} fields, got field_dims of "
                              f"length {len(field_dims)}")
        device = next((p.device for p in self.parameters()), None)
        for table in self.tables():
            table.build(sum(field_dims), device=device)
        self.field_dims = field_dims

    def _maybe_build(self) -> None:
        if self.field_dims is not None:
            self.build(self.field_dims)


class FM(CTRModel):
    """Factorization Machine (Rendle 2010, https://doi.org/10.1109/ICDM.2010.127): linear term + pairwise FM.

    Shapes: ``x [B, F]`` -> ``embedding [B, F, E]`` -> logit ``[B]``.
    """

    name = "fm"

    def __init__(self, field_dims: Sequence[int] | None = None, embed_dim: int = 16, num_fields: int = 39) -> None:
        super().__init__(field_dims, num_fields)
        self.embedding = FeaturesEmbedding(embed_dim)
        self.linear = FeaturesLinear()
        self.fm = FactorizationMachine()
        self._maybe_build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.linear(x) + self.fm(self.embedding(x))).squeeze(-1)


class DeepFM(CTRModel):
    """DeepFM (Guo et al. 2017, https://arxiv.org/abs/1703.04247): linear + FM + MLP on the flattened embeddings.

    ``detach_mlp_input`` (default True, as in the DFA reference code): the MLP reads ``embedding.detach()``, so the
    embeddings learn through the FM part only and the MLP (trained by DFA) sends them no signal. Set it False for
    torchfm's plain backprop DeepFM.

    Shapes: ``x [B, F]`` -> ``embedding [B, F, E]`` -> ``mlp.i [B, H]`` -> ``head [B, 1]`` -> logit ``[B]``.
    """

    name = "deepfm"

    def __init__(
        self,
        field_dims: Sequence[int] | None = None,
        embed_dim: int = 10,
        mlp_dims: Sequence[int] = (400, 400, 400),
        dropout: float = 0.0,
        detach_mlp_input: bool = True,
        num_fields: int = 39,
    ) -> None:
        super().__init__(field_dims, num_fields)
        self.detach_mlp_input = detach_mlp_input
        self.embedding = FeaturesEmbedding(embed_dim)
        self.linear = FeaturesLinear()
        self.fm = FactorizationMachine()
        self.mlp = mlp(self.num_fields * embed_dim, mlp_dims, dropout)
        self.head = nn.Linear(mlp_dims[-1], 1)
        self._maybe_build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding(x)
        deep = (e.detach() if self.detach_mlp_input else e).flatten(1)
        return (self.linear(x) + self.fm(e) + self.head(self.mlp(deep))).squeeze(-1)


class DeepCrossNetwork(CTRModel):
    """Deep & Cross Network (Wang et al. 2017, https://arxiv.org/abs/1708.05123): cross layers and an MLP side by
    side on the flattened embeddings, concatenated (``stack``), then one linear layer. The paper clips the
    gradient norm at 100 for this model (a Trainer setting: ``gradient_clip_val: 100``).

    Shapes: ``x [B, F]`` -> ``embedding [B, F, E]`` -> ``cross.layers.i [B, F·E]``, ``mlp.i [B, H]`` ->
    ``stack [B, F·E + H]`` -> ``head [B, 1]`` -> logit ``[B]``.
    """

    name = "deepcross"

    def __init__(
        self,
        field_dims: Sequence[int] | None = None,
        embed_dim: int = 16,
        num_cross_layers: int = 6,
        mlp_dims: Sequence[int] = (1024, 1024),
        dropout: float = 0.0,
        num_fields: int = 39,
    ) -> None:
        super().__init__(field_dims, num_fields)
        dim = self.num_fields * embed_dim
        self.embedding = FeaturesEmbedding(embed_dim)
        self.cross = CrossNetwork(dim, num_cross_layers)
        self.mlp = mlp(dim, mlp_dims, dropout)
        self.stack = Concat()
        self.head = nn.Linear(dim + mlp_dims[-1], 1)
        self._maybe_build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding(x).flatten(1)
        return self.head(self.stack(self.cross(e), self.mlp(e))).squeeze(-1)


class AutoInt(CTRModel):
    """AutoInt (Song et al. 2019, https://arxiv.org/abs/1810.11921) as in torchfm: embeddings projected to
    ``attn_embed_dim``, ``num_attn_layers`` multi-head self-attention layers over the fields, a residual projection
    of the embeddings added at the end (``has_residual``), ReLU + flatten (``attn_out``) -> linear; plus the linear
    term and an MLP on the flattened embeddings.

    Shapes: ``x [B, F]`` -> ``embedding [B, F, E]`` -> ``attn_embedding``/``attention.i [B, F, A]`` ->
    ``attn_out [B, F·A]``; ``mlp.i [B, H]`` -> ``head [B, 1]``; logit ``[B]``.
    """

    name = "autoint"

    def __init__(
        self,
        field_dims: Sequence[int] | None = None,
        embed_dim: int = 16,
        attn_embed_dim: int = 32,
        num_heads: int = 2,
        num_attn_layers: int = 3,
        mlp_dims: Sequence[int] = (400, 400, 400),
        dropout: float = 0.0,
        has_residual: bool = True,
        num_fields: int = 39,
    ) -> None:
        super().__init__(field_dims, num_fields)
        self.embedding = FeaturesEmbedding(embed_dim)
        self.linear = FeaturesLinear()
        self.attn_embedding = nn.Linear(embed_dim, attn_embed_dim)
        self.attention = nn.ModuleList(
            SelfAttention(attn_embed_dim, num_heads, dropout) for _ in range(num_attn_layers)
        )
        self.residual = nn.Linear(embed_dim, attn_embed_dim) if has_residual else None
        self.attn_out = ReluFlatten()
        self.attn_fc = nn.Linear(self.num_fields * attn_embed_dim, 1)
        self.mlp = mlp(self.num_fields * embed_dim, mlp_dims, dropout)
        self.head = nn.Linear(mlp_dims[-1], 1)
        self._maybe_build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding(x)
        a = self.attn_embedding(e)
        for layer in self.attention:
            a = layer(a)
        if self.residual is not None:
            a = a + self.residual(e)
        cross = self.attn_fc(self.attn_out(a))
        return (self.linear(x) + cross + self.head(self.mlp(e.flatten(1)))).squeeze(-1)


class AFN(CTRModel):
    """Adaptive Factorization Network (Cheng et al. 2020, https://arxiv.org/abs/1909.03276): logarithmic neurons
    learn arbitrary-order interactions, followed by an MLP; plus the linear term.

    Shapes: ``x [B, F]`` -> ``embedding [B, F, E]`` -> ``lnn [B, L·E]`` -> ``mlp.i [B, H]`` -> ``head [B, 1]``;
    logit ``[B]``.
    """

    name = "afn"

    def __init__(
        self,
        field_dims: Sequence[int] | None = None,
        embed_dim: int = 10,
        lnn_dim: int = 1500,
        mlp_dims: Sequence[int] = (400, 400, 400),
        dropout: float = 0.0,
        num_fields: int = 39,
    ) -> None:
        super().__init__(field_dims, num_fields)
        self.embedding = FeaturesEmbedding(embed_dim)
        self.linear = FeaturesLinear()
        self.lnn = LNN(self.num_fields, embed_dim, lnn_dim)
        self.mlp = mlp(lnn_dim * embed_dim, mlp_dims, dropout)
        self.head = nn.Linear(mlp_dims[-1], 1)
        self._maybe_build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.linear(x) + self.head(self.mlp(self.lnn(self.embedding(x))))).squeeze(-1)


MODELS: dict[str, type[CTRModel]] = {m.name: m for m in (FM, DeepFM, DeepCrossNetwork, AutoInt, AFN)}
