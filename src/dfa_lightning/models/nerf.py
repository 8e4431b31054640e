"""NeRF MLP (Mildenhall et al., 2020, https://arxiv.org/abs/2003.08934) with named DFA feedback points.

Every place where the DFA paper (Launay et al., 2020, §2.1 of ``reference/paper.md``) puts a feedback point is a
module whose forward output is one Tensor with the caller's leading batch dims:

- ``trunk.0`` … ``trunk.{num_layers-1}``: ReLU(Linear(h)), ``[..., hidden]``.
- ``feature``: ReLU(fc_feat(h)), ``[..., hidden]`` (the DFA paper's code has this ReLU; Mildenhall et al. do not).
- ``views.0``: ReLU(Linear([feature, enc(d)])), ``[..., hidden // 2]``.
- ``sigma_head`` ``[..., 1]`` and ``rgb_head`` ``[..., 3]``: raw outputs, trained by BP in the paper.

The trunk, feature and view layers are :class:`LinearReLU` modules (an ``nn.Linear`` whose forward applies the ReLU),
so they have no children and a glob such as ``trunk.*`` matches exactly the trunk layers, never a sub-layer.

Paper-code quirk: ``train_nerf.py`` of the paper never passes ``num_layers`` or ``skip_connect_every`` and the 16
released checkpoints are 128 wide, so the published numbers were probably produced by a **4-layer, 128-wide trunk
without skip** (``NeRFMLP(num_layers=4, hidden=128, skip=None)``), not the 8×256 skip-at-4 network of the NeRF paper
(the default here). Both can be built.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfa_lightning.errors import ConfigError

#: Feedback-point globs (``fnmatch`` on ``model.named_modules()``). "paper": after every trunk ReLU, after the ReLU
#: of fc_feat and of the view layer; ``sigma_head`` and ``rgb_head`` train by BP. The DFA output is the model itself
#: (the raw 4-d (rgb, sigma) per point).
FEEDBACK_POINTS: dict[str, list[str]] = {"paper": ["trunk.*", "feature", "views.0"]}


class PositionalEncoding(nn.Module):
    r"""NeRF positional encoding :math:`\gamma(x) = [x, \sin(f_1 x), \cos(f_1 x), \dots, \sin(f_L x), \cos(f_L x)]`.

    Frequencies are :math:`f_k = 2^{k}`, :math:`k = 0 \dots L-1` with log sampling, else evenly spaced between
    :math:`2^0` and :math:`2^{L-1}`. No factor :math:`\pi`, as in krrish94/nerf-pytorch and the DFA paper's code.

    Args:
        num_freqs (int): number of frequencies L.
        in_dim (int, optional): size of the last input dim. (default: ``3``)
        include_input (bool, optional): prepend the raw input. (default: ``True``)
        log_sampling (bool, optional): frequencies ``2**k`` rather than linear. (default: ``True``)

    Shapes:
        input ``[..., in_dim]`` → output ``[..., out_dim]`` with
        ``out_dim = in_dim * (include_input + 2 * num_freqs)`` (63 for L=10, 27 for L=4 with ``in_dim=3``).
    """

    freqs: Tensor

    def __init__(self, num_freqs: int, in_dim: int = 3, include_input: bool = True, log_sampling: bool = True):
        super().__init__()
        if num_freqs < 0:
            raise ConfigError(f"PositionalEncoding: num_freqs must be >= 0, got {num_freqs}")
        self.num_freqs, self.in_dim, self.include_input = num_freqs, in_dim, include_input
        if log_sampling:
            freqs = 2.0 ** torch.linspace(0.0, num_freqs - 1, num_freqs)
        else:
            freqs = torch.linspace(2.0**0, 2.0 ** (num_freqs - 1), num_freqs)
        self.register_buffer("freqs", freqs, persistent=False)
        self.out_dim = in_dim * (int(include_input) + 2 * num_freqs)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.unsqueeze(-2) * self.freqs.to(x.dtype).unsqueeze(-1)  # [..., L, D]
        enc = torch.stack((torch.sin(xf), torch.cos(xf)), dim=-2)  # [..., L, 2, D]: sin, cos per frequency
        enc = enc.flatten(-3)  # [..., L*2*D]
        return torch.cat((x, enc), dim=-1) if self.include_input else enc

    def extra_repr(self) -> str:
        return f"num_freqs={self.num_freqs}, in_dim={self.in_dim}, out_dim={self.out_dim}"


class LinearReLU(nn.Linear):
    """``relu(linear(x))`` as one childless module, so its output (post-ReLU) is a feedback point by name."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))


class NeRFMLP(nn.Module):
    r"""NeRF radiance field: (point, view direction) → raw (rgb, sigma).

    ``h = trunk(enc(x))``; ``sigma = sigma_head(h)``; ``f = feature(h)``; ``v = views.0([f, enc(d)])``;
    ``rgb = rgb_head(v)``; output ``[rgb, sigma]`` (no activation: volume rendering applies sigmoid / ReLU).

    Args:
        num_layers (int, optional): trunk depth, each layer Linear+ReLU. (default: ``8``)
        hidden (int, optional): trunk width H; the view layer is H // 2 wide. (default: ``256``)
        skip (int or None, optional): the encoded input is concatenated to the output of ``trunk.{skip}``, so
            ``trunk.{skip+1}`` takes ``H + 63`` inputs (as in Mildenhall et al., ``skips=[4]``). ``None`` disables
            it. (default: ``4``)
        num_freqs_xyz (int, optional): positional-encoding frequencies for points (63-d with 10). (default: ``10``)
        num_freqs_dir (int, optional): frequencies for view directions (27-d with 4). (default: ``4``)

    Shapes:
        points ``[..., 3]``, directions ``[..., 3]`` (broadcast to the points' leading dims, e.g. ``[R, 1, 3]``
        per ray against ``[R, S, 3]`` samples) → ``[..., 4]`` = (r, g, b, sigma), raw.
    """

    def __init__(
        self,
        num_layers: int = 8,
        hidden: int = 256,
        skip: int | None = 4,
        num_freqs_xyz: int = 10,
        num_freqs_dir: int = 4,
    ):
        super().__init__()
        if num_layers < 1 or hidden < 2:
            raise ConfigError(f"NeRFMLP: need num_layers >= 1 and hidden >= 2, got {num_layers}, {hidden}")
        if skip is not None and not 0 <= skip < num_layers - 1:
            raise ConfigError(f"NeRFMLP: skip must be None or in [0, {num_layers - 1}) (num_layers - 1), got {skip}")
        self.skip = skip
        self.pe_xyz = PositionalEncoding(num_freqs_xyz)
        self.pe_dir = PositionalEncoding(num_freqs_dir)
        d_xyz, d_dir = self.pe_xyz.out_dim, self.pe_dir.out_dim
        in_dims = [d_xyz] + [hidden + (d_xyz if i - 1 == skip else 0) for i in range(1, num_layers)]  # skip: +63
        self.trunk = nn.ModuleList(LinearReLU(d, hidden) for d in in_dims)
        self.sigma_head = nn.Linear(hidden, 1)
        # zero bias, as the original NeRF (Keras' default): torch's U(-1/sqrt(H), 1/sqrt(H)) bias outweighs the
        # spread of the initial densities, and a negative draw puts every sample below the ReLU of volume rendering,
        # where no gradient flows: the field then renders nothing, for good
        nn.init.zeros_(self.sigma_head.bias)
        self.feature = LinearReLU(hidden, hidden)
        self.views = nn.ModuleList([LinearReLU(hidden + d_dir, hidden // 2)])
        self.rgb_head = nn.Linear(hidden // 2, 3)

    def forward(self, points: Tensor, directions: Tensor) -> Tensor:
        x = self.pe_xyz(points)  # [..., 63]
        d = self.pe_dir(torch.broadcast_to(directions, (*points.shape[:-1], directions.shape[-1])))  # [..., 27]
        h = x
        for i, layer in enumerate(self.trunk):
            h = layer(h)  # [..., H]
            if i == self.skip:
                h = torch.cat((x, h), dim=-1)  # [..., 63 + H], input first as in Mildenhall et al.
        sigma = self.sigma_head(h)  # [..., 1]
        v = self.views[0](torch.cat((self.feature(h), d), dim=-1))  # [..., H/2]
        return torch.cat((self.rgb_head(v), sigma), dim=-1)  # [..., 4]


class NeRF(nn.Module):
    """NeRF's two radiance fields for hierarchical sampling: ``coarse`` is evaluated at stratified samples of each
    ray, ``fine`` at those plus the samples drawn where the coarse weights are large (Mildenhall et al., §5.2).

    The DFA paper trains each with its own DFA and feedback matrix: two ``FeedbackAlignmentStrategy`` callbacks,
    ``output: coarse`` with points ``coarse.trunk.*``, ``coarse.feature``, ``coarse.views.0``, and the same for
    ``fine`` (see ``recipes/nerf_dfa.yaml``). Both fields have the same architecture (the paper's code also builds
    the coarse one with the fine one's width).

    Args:
        num_layers, hidden, skip, num_freqs_xyz, num_freqs_dir: as :class:`NeRFMLP` (default: the NeRF paper's
            8 x 256 with a skip at 4; the DFA paper's released checkpoints are ``num_layers=4, hidden=128,
            skip=None``).
        hierarchical: build the ``fine`` field; without it only ``coarse`` exists (default: ``True``).

    Shapes:
        ``forward(points [..., 3], directions [..., 3], network)`` -> raw ``[..., 4]`` of ``coarse`` or ``fine``.
    """

    def __init__(self, num_layers: int = 8, hidden: int = 256, skip: int | None = 4, num_freqs_xyz: int = 10,
                 num_freqs_dir: int = 4, hierarchical: bool = True) -> None:
        super().__init__()
        make = lambda: NeRFMLP(num_layers, hidden, skip, num_freqs_xyz, num_freqs_dir)  # noqa: E731
        self.coarse = make()
        self.fine = make() if hierarchical else None

    def forward(self, points: Tensor, directions: Tensor, network: str = "coarse") -> Tensor:
        if network == "coarse":
            return self.coarse(points, directions)
        if network == "fine" and self.fine is not None:
            return self.fine(points, directions)
        raise ConfigError(f"NeRF has no {network!r} field (hierarchical={self.fine is not None}); fine samples need "
                          "`hierarchical: true`, or set the task's fine_samples to 0")
