"""The plain-PyTorch SplineConv: the B-spline basis, the weighting, and the layer against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from dfa_lightning.models.spline_torch import TorchSplineConv, spline_basis, spline_weighting

try:  # the compiled reference, when some machine has it (CI does not): the same numbers, op for op
    import torch_spline_conv
except (ImportError, OSError):
    torch_spline_conv = None


@pytest.mark.parametrize("degree", [1, 2, 3])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_basis_is_a_partition_of_unity_with_valid_kernel_indices(degree, dim):
    g = torch.Generator().manual_seed(degree * 10 + dim)
    pseudo = torch.rand(50, dim, generator=g, dtype=torch.float64)
    kernel_size = torch.tensor([5, 4, 6][:dim])
    basis, index = spline_basis(pseudo, kernel_size, torch.ones(dim, dtype=torch.uint8), degree)
    assert basis.shape == index.shape == (50, (degree + 1) ** dim)
    torch.testing.assert_close(basis.sum(1), torch.ones(50, dtype=torch.float64))
    assert (basis >= 0).all() and index.min() >= 0 and index.max() < int(kernel_size.prod())


def test_degree_one_kernel_two_interpolates_between_the_two_weight_matrices():
    # the paper's setting (dim 1, kernel 2, TargetIndegree u in [0, 1]): W(u) = (1 - u) W0 + u W1
    torch.manual_seed(0)
    conv = TorchSplineConv(3, 2, dim=1, kernel_size=2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    edge_index = torch.tensor([[0, 1, 2, 3, 1], [1, 2, 1, 1, 0]])
    u = torch.tensor([[0.0], [0.25], [0.5], [1.0], [0.75]], dtype=torch.float64)
    out = conv(x, edge_index, u)
    w0, w1 = conv.weight[0], conv.weight[1]
    expected = torch.zeros(4, 2, dtype=torch.float64)
    count = torch.zeros(4, 1, dtype=torch.float64)
    for (src, dst), ue in zip(edge_index.t().tolist(), u[:, 0].tolist()):
        expected[dst] += x[src] @ ((1 - ue) * w0 + ue * w1)
        count[dst] += 1
    expected = expected / count.clamp(min=1) + x @ conv.lin.weight.t() + conv.bias
    torch.testing.assert_close(out, expected)


def test_parameters_carry_pyg_splineconv_names_and_shapes():
    conv = TorchSplineConv(1433, 16, dim=1, kernel_size=2)
    shapes = {n: tuple(p.shape) for n, p in conv.named_parameters()}
    assert shapes == {"weight": (2, 1433, 16), "lin.weight": (16, 1433), "bias": (16,)}


@pytest.mark.skipif(torch_spline_conv is None, reason="torch-spline-conv (compiled reference) is not installed")
@pytest.mark.parametrize("degree", [1, 2, 3])
@pytest.mark.parametrize("dim", [1, 2])
def test_matches_the_compiled_torch_spline_conv(degree, dim):
    g = torch.Generator().manual_seed(7)
    pseudo = torch.rand(40, dim, generator=g, dtype=torch.float64)
    kernel_size, is_open = torch.tensor([5, 3][:dim]), torch.tensor([1, 0][:dim], dtype=torch.uint8)
    ours = spline_basis(pseudo, kernel_size, is_open, degree)
    ref = torch_spline_conv.spline_basis(pseudo, kernel_size, is_open, degree)
    # the S pieces may come in another order: compare per edge as {kernel index: basis} maps
    for e in range(40):
        mine = {int(i): float(b) for b, i in zip(ours[0][e], ours[1][e])}
        theirs = {int(i): float(b) for b, i in zip(ref[0][e], ref[1][e])}
        assert mine.keys() == theirs.keys() and all(abs(mine[k] - theirs[k]) < 1e-12 for k in mine)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(int(kernel_size.prod()), 6, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(spline_weighting(x, weight, *ours), torch_spline_conv.spline_weighting(x, weight, *ref))
