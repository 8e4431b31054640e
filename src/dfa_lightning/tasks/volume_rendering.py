"""NeRF's volume rendering (Mildenhall et al. 2020, §4 and §5.2), as pure functions of rays and raw model outputs.

It has no parameters, so a DFA error taken at the raw ``(rgb, sigma)`` of every sample has already been
back-propagated through it, as in the DFA paper's NeRF (``reference/paper.md`` §2.1).

Shapes: ``R`` rays, ``S`` samples per ray; rays ``[R, 9]`` = origin, direction, unit view direction.
"""
from __future__ import annotations

import torch
from torch import Tensor


def stratified_depths(rays: int, samples: int, near: float, far: float, perturb: bool,
                      device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """``[R, S]`` depths: evenly spaced in ``[near, far]``, or with ``perturb`` one uniform draw per bin."""
    t = torch.linspace(0.0, 1.0, samples, device=device)
    z = (near * (1.0 - t) + far * t).expand(rays, samples)
    if not perturb:
        return z
    mids = 0.5 * (z[:, 1:] + z[:, :-1])
    upper = torch.cat([mids, z[:, -1:]], -1)
    lower = torch.cat([z[:, :1], mids], -1)
    u = torch.rand(z.shape, device=device, generator=generator)
    return lower + (upper - lower) * u


def composite(raw: Tensor, depths: Tensor, directions: Tensor, white_background: bool,
              noise_std: float = 0.0) -> tuple[Tensor, Tensor]:
    """NeRF's ``raw2outputs``: ``raw [R, S, 4]`` (rgb logits, density) at ``depths [R, S]`` -> pixel colours
    ``[R, 3]`` and the samples' weights ``[R, S]`` (alpha compositing, the last interval infinite)."""
    deltas = torch.cat([depths[:, 1:] - depths[:, :-1], torch.full_like(depths[:, :1], 1e10)], -1)
    deltas = deltas * directions.norm(dim=-1, keepdim=True)  # distances in world units
    sigma = raw[..., 3]
    if noise_std > 0:
        sigma = sigma + torch.randn_like(sigma) * noise_std
    alpha = 1.0 - torch.exp(-torch.relu(sigma) * deltas)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], -1), -1)[:, :-1]
    weights = alpha * transmittance
    rgb = (weights.unsqueeze(-1) * torch.sigmoid(raw[..., :3])).sum(-2)
    if white_background:
        rgb = rgb + (1.0 - weights.sum(-1, keepdim=True))
    return rgb, weights


def importance_depths(depths: Tensor, weights: Tensor, samples: int, perturb: bool,
                      generator: torch.Generator | None = None) -> Tensor:
    """NeRF's ``sample_pdf``: ``[R, samples]`` depths drawn from the piecewise-constant density that the coarse
    ``weights`` put on the bins between the coarse samples' midpoints (inverse transform sampling; evenly spaced
    quantiles without ``perturb``). No gradient flows into the coarse network through them."""
    bins = 0.5 * (depths[:, 1:] + depths[:, :-1])  # [R, S-1]
    w = weights[:, 1:-1].detach() + 1e-5  # [R, S-2]: one per bin
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)  # [R, S-1]
    if perturb:
        u = torch.rand((cdf.shape[0], samples), device=cdf.device, generator=generator)
    else:
        u = torch.linspace(0.0, 1.0, samples, device=cdf.device).expand(cdf.shape[0], samples)
    idx = torch.searchsorted(cdf, u.contiguous(), right=True)
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(1, below), cdf.gather(1, above)
    bin_lo, bin_hi = bins.gather(1, below), bins.gather(1, above)
    denom = torch.where(cdf_hi - cdf_lo < 1e-5, torch.ones_like(cdf_lo), cdf_hi - cdf_lo)
    return (bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)).detach()


def sample_points(rays: Tensor, depths: Tensor) -> tuple[Tensor, Tensor]:
    """Points ``[R, S, 3]`` along the rays and their view directions ``[R, 1, 3]`` (broadcast by the model)."""
    origins, directions, viewdirs = rays[:, 0:3], rays[:, 3:6], rays[:, 6:9]
    return origins.unsqueeze(1) + directions.unsqueeze(1) * depths.unsqueeze(-1), viewdirs.unsqueeze(1)
