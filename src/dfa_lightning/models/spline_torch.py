"""SplineConv (Fey et al. 2018) in plain PyTorch, for machines without SplineConv's compiled kernels.

PyG's :class:`~torch_geometric.nn.SplineConv` takes its two kernels, ``spline_basis`` and ``spline_weighting``, from
``pyg-lib`` (PyG >= 2.7), whose wheels exist only for some torch / CUDA builds. :class:`TorchSplineConv` is the same
layer with those two kernels written as tensor ops: the same parameters under the same names (``weight``
``[K, F_in, F_out]``, ``lin.weight``, ``bias``), the same initialisation, mean aggregation and root weight, so a
checkpoint loads into either. It is slower (it materialises ``[E, S, F_out]``), which is fine at Planetoid scale.
The basis follows torch-spline-conv's definition: for every edge, the ``(degree + 1) ** dim`` B-spline pieces that
are non-zero at its pseudo-coordinate, with their kernel indices.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torch.nn import Parameter
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.nn.inits import uniform, zeros

__all__ = ["TorchSplineConv", "spline_basis", "spline_weighting"]


def _piece(v: Tensor, k_mod: int, degree: int) -> Tensor:
    """Value at ``v`` in [0, 1) of the ``k_mod``-th uniform B-spline piece of ``degree`` (torch-spline-conv's)."""
    if degree == 1:
        return 1 - v if k_mod == 0 else v
    if degree == 2:
        return (0.5 * v * v - v + 0.5, -v * v + v + 0.5, 0.5 * v * v)[k_mod]
    if degree == 3:
        return ((1 - v) ** 3 / 6, (3 * v ** 3 - 6 * v * v + 4) / 6, (-3 * v ** 3 + 3 * v * v + 3 * v + 1) / 6,
                v ** 3 / 6)[k_mod]
    raise ValueError(f"B-spline degree must be 1, 2 or 3, got {degree}")


def spline_basis(pseudo: Tensor, kernel_size: Tensor, is_open_spline: Tensor, degree: int) -> tuple[Tensor, Tensor]:
    """``(basis [E, S], weight_index [E, S])`` with ``S = (degree + 1) ** dim``, for ``pseudo`` ``[E, dim]`` in [0, 1]."""
    pseudo = pseudo.unsqueeze(-1) if pseudo.dim() == 1 else pseudo
    dim = pseudo.size(1)
    basis, index = [], []
    for k_mods in itertools.product(range(degree + 1), repeat=dim):  # dimension 0 varies fastest below
        b = pseudo.new_ones(pseudo.size(0))
        wi = torch.zeros(pseudo.size(0), dtype=torch.long, device=pseudo.device)
        offset = 1
        for d, k_mod in enumerate(reversed(k_mods)):
            ks = int(kernel_size[d])
            v = pseudo[:, d] * (ks - degree * int(is_open_spline[d]))
            wi = wi + ((v.floor().long() + k_mod) % ks) * offset
            offset *= ks
            b = b * _piece(v - v.floor(), k_mod, degree)
        basis.append(b)
        index.append(wi)
    return torch.stack(basis, dim=1), torch.stack(index, dim=1)


def spline_weighting(x: Tensor, weight: Tensor, basis: Tensor, weight_index: Tensor) -> Tensor:
    """``out[e] = sum_s basis[e, s] * x[e] @ weight[weight_index[e, s]]``: ``[E, F_out]``."""
    per_kernel = torch.einsum("ei,kio->eko", x, weight)  # x @ W_k for every kernel k: [E, K, F_out]
    picked = per_kernel.gather(1, weight_index.unsqueeze(-1).expand(-1, -1, weight.size(-1)))  # [E, S, F_out]
    return (basis.unsqueeze(-1) * picked).sum(dim=1)


class TorchSplineConv(MessagePassing):
    """PyG's ``SplineConv(in_channels, out_channels, dim, kernel_size)`` without compiled kernels (see module doc)."""

    def __init__(self, in_channels: int, out_channels: int, dim: int, kernel_size: int | list[int],
                 is_open_spline: bool = True, degree: int = 1, aggr: str = "mean", root_weight: bool = True,
                 bias: bool = True) -> None:
        super().__init__(aggr=aggr)
        if degree not in (1, 2, 3):
            raise ValueError(f"TorchSplineConv: degree must be 1, 2 or 3, got {degree}")
        self.in_channels, self.out_channels, self.dim, self.degree = in_channels, out_channels, dim, degree
        self.root_weight = root_weight
        sizes = list(kernel_size) if isinstance(kernel_size, (list, tuple)) else [kernel_size] * dim
        self.register_buffer("kernel_size", torch.tensor(sizes, dtype=torch.long))
        self.register_buffer("is_open_spline", torch.tensor([is_open_spline] * dim, dtype=torch.uint8))
        self.K = int(torch.tensor(sizes).prod())
        self.weight = Parameter(torch.empty(self.K, in_channels, out_channels))
        self.lin = Linear(in_channels, out_channels, bias=False, weight_initializer="uniform") if root_weight else None
        self.bias = Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        uniform(self.weight.size(0) * self.weight.size(1), self.weight)  # as PyG's SplineConv
        if self.lin is not None:
            self.lin.reset_parameters()
        if self.bias is not None:
            zeros(self.bias)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        out = self.propagate(edge_index, x=x, edge_attr=edge_attr)
        if self.lin is not None:
            out = out + self.lin(x)
        if self.bias is not None:
            out = out + self.bias
        return out

    def message(self, x_j: Tensor, edge_attr: Tensor) -> Tensor:
        basis, weight_index = spline_basis(edge_attr, self.kernel_size, self.is_open_spline, self.degree)
        return spline_weighting(x_j, self.weight, basis, weight_index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_channels}, {self.out_channels}, dim={self.dim})"
