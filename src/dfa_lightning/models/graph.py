"""Graph models of the DFA paper (Launay et al. 2020, §2.3 and §2.4), written so that DFA needs no model edits.

Every place where the paper puts a ``DFALayer`` is a named submodule here whose forward output is one Tensor with
the nodes as first dimension. A recipe selects them by glob on ``model.named_modules()``; :data:`FEEDBACK_POINTS`
lists the globs that reproduce the paper for each model. Models return LOGITS (no ``log_softmax``): the task applies
the cross-entropy, so the DFA error at the output is ``(softmax - onehot) / N_train`` as in the paper's GCNs.

Defaults are the paper's backprop (BP) settings; its DFA settings differ only in constructor arguments:

========  ===========================================  =============================================
model     BP (defaults here)                           DFA in the paper
========  ===========================================  =============================================
gcn       dropout 0.5; Adam lr 0.01, wd 5e-4 on conv1  dropout 0.1; wd 1e-4 on conv1
cheb      dropout 0.5; Adam lr 0.01, wd 5e-4 on conv1  dropout 0.0; wd 1e-4 on conv1
spline    dropout 0.5; Adam lr 0.01, wd 5e-3 (all)     identical
gat       dropout 0.6, att 0.6/0.6; lr 0.005, wd 5e-4  dropout 0.1, att 0.6/0.0; wd 1e-4
dna       dropout 0.5, conv 0.8; lr 0.005, wd 5e-4     dropout 0.0, conv 0.0; lr 0.01, wd 0
gae       Adam lr 0.01                                 lr 0.01 (0.02 on CiteSeer)
========  ===========================================  =============================================

The paper's DNA output DFA wraps ``log_softmax`` (e = -onehot / N, independent of the prediction); here the error is
taken at the logits like every other model, and ``DNA(log_softmax=True)`` with the task's ``loss: nll`` reproduces the
paper's quirk.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import GAE, ChebConv, DNAConv, GATConv, GCNConv

from dfa_lightning.errors import ConfigError

__all__ = [
    "FEEDBACK_POINTS",
    "GRAPH_MODELS",
    "GCN",
    "Cheb",
    "Spline",
    "GAT",
    "DNA",
    "GCNEncoder",
    "GraphAutoEncoder",
    "GCNBlock",
    "GCNStack",
    "spline_available",
]

#: Globs (on ``named_modules()`` names, ``fnmatch`` style) of the paper's hidden DFA points for each model.
#: Each matches only modules whose output is a Tensor ``[num_nodes, width]``; the output DFA point is the model
#: output itself (logits ``[N, C]``, or the latent ``z`` ``[N, 16]`` for ``gae``).
FEEDBACK_POINTS: dict[str, list[str]] = {
    "gcn": ["hidden"],  # ReLU -> dropout after conv1 (the point comes after dropout)
    "cheb": ["hidden"],  # ReLU -> dropout after conv1 (after dropout)
    "spline": ["hidden"],  # ELU after conv1, before the hidden dropout
    "gat": ["hidden"],  # ELU after conv1 (64 wide), before the hidden dropout
    "dna": ["lin1_act", "acts.*"],  # Linear+ReLU, then the ReLU after each of the DNAConvs
    "gae": ["encoder.hidden"],  # ReLU after the encoder's conv1 (32 wide)
    "gcn_stack": ["blocks.*"],  # every block's output (not the paper's: the failure map's deep GCN)
}


class _GraphModel(nn.Module):
    """Drops the GCN normalisation caches of ``cached=True`` convs whenever the model moves (``.to()``, ``.cuda()``),
    so that a forward pass on one device (e.g. a shape probe on CPU) never leaves a stale cache on another."""

    def _apply(self, fn, *args, **kwargs):
        for module in self.modules():
            if hasattr(module, "_cached_edge_index"):
                module._cached_edge_index = None
            if hasattr(module, "_cached_adj_t"):
                module._cached_adj_t = None
        return super()._apply(fn, *args, **kwargs)


def _edge_weight(edge_attr: Tensor | None, model: str) -> Tensor | None:
    """``edge_attr`` as a GCN/Cheb edge weight: ``None``, ``[E]`` or ``[E, 1]`` are accepted."""
    if edge_attr is None:
        return None
    if edge_attr.dim() == 2 and edge_attr.size(1) == 1:
        return edge_attr.view(-1)
    if edge_attr.dim() == 1:
        return edge_attr
    raise ConfigError(
        f"{model}: edge_attr of shape {tuple(edge_attr.shape)} cannot be used as edge weights (need [E] or [E, 1]); "
        "use `transform: normalize_features` or `none` in the data section"
    )


class GCN(_GraphModel):
    """GCNConv(F→hidden, cached) → ReLU → dropout → GCNConv(hidden→C). Feedback point: ``hidden`` (after dropout).

    Args:
        in_channels: number of node features F.
        out_channels: number of classes C.
        hidden: width of the hidden layer (default: 16).
        dropout: dropout on the hidden layer (default: 0.5; the paper's DFA run uses 0.1).
        cached: cache the normalised adjacency (transductive, full batch) (default: True).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16, dropout: float = 0.5,
                 cached: bool = True) -> None:
        super().__init__()
        self.conv1 = GCNConv(in_channels, hidden, cached=cached)
        self.hidden = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
        self.conv2 = GCNConv(hidden, out_channels, cached=cached)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        w = _edge_weight(edge_attr, "gcn")
        x = self.hidden(self.conv1(x, edge_index, w))
        return self.conv2(x, edge_index, w)


class Cheb(_GraphModel):
    """ChebConv(F→hidden, K) → ReLU → dropout → ChebConv(hidden→C, K). Feedback point: ``hidden`` (after dropout).

    Args:
        in_channels, out_channels: F and C.
        hidden: hidden width (default: 16).
        dropout: hidden dropout (default: 0.5; the paper's DFA run uses 0).
        K: Chebyshev filter size (default: 2).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16, dropout: float = 0.5,
                 K: int = 2) -> None:
        super().__init__()
        self.conv1 = ChebConv(in_channels, hidden, K=K)
        self.hidden = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
        self.conv2 = ChebConv(hidden, out_channels, K=K)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        w = _edge_weight(edge_attr, "cheb")
        x = self.hidden(self.conv1(x, edge_index, w))
        return self.conv2(x, edge_index, w)


def _pyg_wheel_hint(package: str) -> str:
    version = torch.__version__.split("+")[0]
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return f"pip install {package} -f https://data.pyg.org/whl/torch-{version}+{cuda}.html"


SPLINE_KERNELS = ("pyg", "torch")


def _make_spline_conv(*args, kernels: str = "pyg", **kwargs):
    """A SplineConv: PyG's (compiled kernels; a ConfigError naming the package to install when they are missing)
    or, with ``kernels="torch"``, :class:`~dfa_lightning.models.spline_torch.TorchSplineConv`."""
    if kernels not in SPLINE_KERNELS:
        raise ConfigError(f"model 'spline': kernels must be one of {SPLINE_KERNELS}, got {kernels!r}")
    if kernels == "torch":
        from dfa_lightning.models.spline_torch import TorchSplineConv

        return TorchSplineConv(*args, **kwargs)
    from torch_geometric.nn import SplineConv

    try:
        return SplineConv(*args, **kwargs)
    except ImportError as err:
        # PyG >= 2.7 takes the spline kernels from pyg-lib; older releases from torch-spline-conv.
        package = "pyg-lib" if "pyg" in str(err).lower() else "torch-spline-conv"
        raise ConfigError(
            f"model 'spline' needs SplineConv's compiled kernels, which are not installed here ({err}). "
            f"Install them with `{_pyg_wheel_hint(package)}` (the wheel must match your torch and CUDA versions), "
            "or set `kernels: torch` in the model's init_args for the plain-PyTorch SplineConv (same layer, slower)"
        ) from None


def spline_available() -> tuple[bool, str]:
    """(whether :class:`Spline` can be built here, the reason when it cannot)."""
    try:
        _make_spline_conv(1, 1, dim=1, kernel_size=2)
    except ConfigError as err:
        return False, str(err)
    return True, ""


class Spline(_GraphModel):
    """dropout → SplineConv(F→hidden, dim, kernel_size) → ELU → dropout → SplineConv(hidden→C).

    Needs ``edge_attr`` pseudo-coordinates in [0, 1] (data ``transform: target_indegree``). With ``kernels: pyg`` it
    uses PyG's SplineConv and its compiled kernels (``pyg-lib`` for PyG >= 2.7, ``torch-spline-conv`` before);
    without them the constructor raises :class:`ConfigError` naming the wheel. ``kernels: torch`` uses
    :class:`~dfa_lightning.models.spline_torch.TorchSplineConv`, the same layer in plain PyTorch (same parameter
    names, slower). Feedback point: ``hidden`` (the ELU, before the hidden dropout).

    Args:
        in_channels, out_channels: F and C.
        hidden: hidden width (default: 16).
        dropout: input and hidden dropout (default: 0.5, BP and DFA alike).
        dim: pseudo-coordinate dimension (default: 1).
        kernel_size: B-spline kernel size (default: 2).
        kernels: ``pyg`` (compiled) or ``torch`` (plain PyTorch) SplineConv (default: ``"pyg"``).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16, dropout: float = 0.5,
                 dim: int = 1, kernel_size: int = 2, kernels: str = "pyg") -> None:
        super().__init__()
        self.drop_in = nn.Dropout(dropout)
        self.conv1 = _make_spline_conv(in_channels, hidden, dim=dim, kernel_size=kernel_size, kernels=kernels)
        self.hidden = nn.ELU()
        self.drop_hidden = nn.Dropout(dropout)
        self.conv2 = _make_spline_conv(hidden, out_channels, dim=dim, kernel_size=kernel_size, kernels=kernels)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        if edge_attr is None:
            raise ConfigError("model 'spline' needs edge_attr pseudo-coordinates: use `transform: target_indegree`")
        x = self.hidden(self.conv1(self.drop_in(x), edge_index, edge_attr))
        return self.conv2(self.drop_hidden(x), edge_index, edge_attr)


class GAT(_GraphModel):
    """dropout → GATConv(F→hidden, heads) → ELU → dropout → GATConv(hidden·heads→C, out_heads, mean).

    Feedback point: ``hidden`` (the ELU, ``hidden·heads`` = 64 wide, before the hidden dropout). ``edge_attr`` is
    ignored (GATConv is built without edge features).

    Args:
        in_channels, out_channels: F and C.
        hidden: channels per head of conv1 (default: 8).
        heads: attention heads of conv1 (default: 8).
        out_heads: attention heads of conv2, averaged (default: 1).
        dropout: input and hidden dropout (default: 0.6; the paper's DFA run uses 0.1).
        att_dropout1, att_dropout2: attention dropout of conv1 / conv2 (default: 0.6 / 0.6; DFA: 0.6 / 0).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 8, heads: int = 8, out_heads: int = 1,
                 dropout: float = 0.6, att_dropout1: float = 0.6, att_dropout2: float = 0.6) -> None:
        super().__init__()
        self.drop_in = nn.Dropout(dropout)
        self.conv1 = GATConv(in_channels, hidden, heads=heads, dropout=att_dropout1)
        self.hidden = nn.ELU()
        self.drop_hidden = nn.Dropout(dropout)
        self.conv2 = GATConv(hidden * heads, out_channels, heads=out_heads, concat=False, dropout=att_dropout2)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        x = self.hidden(self.conv1(self.drop_in(x), edge_index))
        return self.conv2(self.drop_hidden(x), edge_index)


class DNA(_GraphModel):
    """Linear(F→hidden)+ReLU → dropout → num_layers × DNAConv with a dense "jumping" history → dropout → Linear(→C).

    Module layout: ``lin1_act`` (Linear+ReLU), ``drop1``, ``convs.<i>`` (DNAConv), ``acts.<i>`` (ReLU after conv i),
    ``drop2``, ``lin2``. The history that each DNAConv attends over is built only from the outputs of ``lin1_act``
    (after ``drop1``) and of ``acts.<i>``; so when those are DFA points (``["lin1_act", "acts.*"]``) and the engine
    detaches them, the history is detached, exactly as the paper's ``x_all.detach()``. DNAConv is pure PyTorch in
    PyG >= 2.3 (torch-sparse is not needed).

    Args:
        in_channels, out_channels: F and C.
        hidden: width of every layer (default: 128).
        num_layers: number of DNAConv layers (default: 5).
        heads, groups: DNAConv attention heads and projection groups (default: 8, 16).
        dropout: dropout after lin1 and before lin2 (default: 0.5; the paper's DFA run uses 0).
        conv_dropout: DNAConv attention dropout (default: 0.8; DFA: 0).
        cached: cache the GCN normalisation in DNAConv (default: True).
        log_softmax: end with a ``log_probs`` LogSoftmax module, as the paper's DNA, so that the output error of DFA
            is taken *after* it (pair with the task's ``loss: nll``): e = -onehot/N, the paper's prediction-independent
            DNA signal (default: False: logits).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 128, num_layers: int = 5, heads: int = 8,
                 groups: int = 16, dropout: float = 0.5, conv_dropout: float = 0.8, cached: bool = True,
                 log_softmax: bool = False) -> None:
        super().__init__()
        if hidden % heads or hidden % groups:
            raise ConfigError(f"model 'dna': hidden={hidden} must be divisible by heads={heads} and groups={groups}")
        self.lin1_act = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU())
        self.drop1 = nn.Dropout(dropout)
        self.convs = nn.ModuleList(
            DNAConv(hidden, heads=heads, groups=groups, dropout=conv_dropout, cached=cached) for _ in range(num_layers)
        )
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(num_layers))
        self.drop2 = nn.Dropout(dropout)
        self.lin2 = nn.Linear(hidden, out_channels)
        self.log_probs = nn.LogSoftmax(dim=-1) if log_softmax else nn.Identity()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        x = self.drop1(self.lin1_act(x))
        x_all = x.unsqueeze(1)  # [N, 1, hidden]
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x_all, edge_index))
            x_all = torch.cat([x_all, x.unsqueeze(1)], dim=1)
        return self.log_probs(self.lin2(self.drop2(x)))


class GCNEncoder(_GraphModel):
    """GAE encoder of the paper: GCNConv(F→hidden) → ReLU (``hidden``) → GCNConv(hidden→out_channels).

    ``cached`` defaults to False: the link-prediction splits encode different edge sets (train edges for train/val,
    train+val edges for test), which a cached normalisation would silently ignore.
    """

    def __init__(self, in_channels: int, hidden: int = 32, out_channels: int = 16, cached: bool = False) -> None:
        super().__init__()
        self.conv1 = GCNConv(in_channels, hidden, cached=cached)
        self.hidden = nn.ReLU()
        self.conv2 = GCNConv(hidden, out_channels, cached=cached)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.conv2(self.hidden(self.conv1(x, edge_index)), edge_index)


class GraphAutoEncoder(GAE):
    """PyG :class:`~torch_geometric.nn.GAE` with a :class:`GCNEncoder` and the inner-product decoder (paper §2.4).

    ``forward(x, edge_index)`` returns the latent ``z`` [N, latent]: that is where the output DFA error is taken
    (the decoder has no parameters). Feedback point: ``encoder.hidden``. Use with
    :class:`~dfa_lightning.tasks.graph.LinkPrediction`.

    Args:
        in_channels: number of node features F.
        hidden: encoder hidden width (default: 32).
        latent: latent width (default: 16).
        cached: cache the encoder's GCN normalisation (default: False, see :class:`GCNEncoder`).
    """

    def __init__(self, in_channels: int, hidden: int = 32, latent: int = 16, cached: bool = False) -> None:
        super().__init__(GCNEncoder(in_channels, hidden, latent, cached=cached))

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        return self.encoder(x, edge_index)


NORMS = ("none", "batch", "layer")
CONVS = ("gcn", "linear")


class GCNBlock(nn.Module):
    """``conv → norm → ReLU → dropout``, plus the block's input when ``residual``: one feedback point per block.

    The block's output is the only path from its input onward (the skip included), so a point on the block cuts
    every path through it. ``conv: linear`` drops the graph (``nn.Linear`` on each node's features).
    """

    def __init__(self, d_in: int, d_out: int, conv: str, norm: str, dropout: float, residual: bool,
                 cached: bool) -> None:
        super().__init__()
        if residual and d_in != d_out:
            raise ConfigError(f"GCNBlock: a residual block needs equal widths, got {d_in} -> {d_out}")
        self.conv = GCNConv(d_in, d_out, cached=cached) if conv == "gcn" else nn.Linear(d_in, d_out)
        self.norm = {"none": nn.Identity, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[norm](d_out)
        self.act = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
        self.residual = residual

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        h = self.conv(x, edge_index, edge_weight) if isinstance(self.conv, GCNConv) else self.conv(x)
        h = self.act(self.norm(h))
        return x + h if self.residual else h


class GCNStack(_GraphModel):
    """A GCN whose depth, width, skips, normalisation and graph use are arguments: the model of the failure map.

    ``blocks.0 … blocks.{L-2}`` (:class:`GCNBlock`, F→H then H→H) then ``head`` (a conv H→C, logits). Feedback points:
    ``blocks.*`` (every block's output). With ``num_layers: 2`` and the defaults it is the paper's :class:`GCN`,
    parameter for parameter and in the same initialisation order (``blocks.0`` is ``conv1`` and ``hidden``, ``head``
    is ``conv2``), so the same seed gives the same run.

    Why its own blocks rather than PyG's ``BasicGNN``: that one applies one activation module to every layer and has
    no per-block output module, so no glob could place a feedback point on each layer, and it has no residual option.

    Args:
        in_channels: node features F.
        out_channels: classes C.
        hidden: block width H (default: 16).
        num_layers: number of convs L, the head included (>= 2; default: 2).
        dropout: after each block's ReLU (default: 0.5).
        residual: add each block's input to its output, from the second block on (the first changes width)
            (default: False).
        norm: ``none``, ``batch`` (BatchNorm1d over the nodes) or ``layer`` (LayerNorm per node), between the conv
            and the ReLU (default: ``"none"``).
        conv: ``gcn`` (GCNConv) or ``linear`` (no graph: an MLP on the node features) (default: ``"gcn"``).
        cached: cache the normalised adjacency (transductive, full batch) (default: True).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16, num_layers: int = 2,
                 dropout: float = 0.5, residual: bool = False, norm: str = "none", conv: str = "gcn",
                 cached: bool = True) -> None:
        super().__init__()
        if int(num_layers) < 2:
            raise ConfigError(f"GCNStack: num_layers must be >= 2 (one block and the head), got {num_layers}")
        if norm not in NORMS:
            raise ConfigError(f"GCNStack: norm must be one of {NORMS}, got {norm!r}")
        if conv not in CONVS:
            raise ConfigError(f"GCNStack: conv must be one of {CONVS}, got {conv!r}")
        widths = [in_channels] + [hidden] * (int(num_layers) - 1)
        self.blocks = nn.ModuleList(
            GCNBlock(d_in, d_out, conv, norm, dropout, residual and i > 0, cached)
            for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])))
        self.head = GCNConv(hidden, out_channels, cached=cached) if conv == "gcn" else nn.Linear(hidden, out_channels)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        w = _edge_weight(edge_attr, "gcn_stack")
        for block in self.blocks:
            x = block(x, edge_index, w)
        return self.head(x, edge_index, w) if isinstance(self.head, GCNConv) else self.head(x)


#: Short names used by :data:`FEEDBACK_POINTS`.
GRAPH_MODELS: dict[str, type[nn.Module]] = {
    "gcn": GCN,
    "cheb": Cheb,
    "spline": Spline,
    "gat": GAT,
    "dna": DNA,
    "gae": GraphAutoEncoder,
    "gcn_stack": GCNStack,
}
