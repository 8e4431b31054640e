"""View synthesis (NeRF): render rays through volume rendering, MSE on the pixel colours, PSNR as the metric.

Batches come from :class:`~dfa_lightning.data.nerf.NeRFDataModule`: ``rays [R, 9]``, ``rgb [R, 3]``, the scene's
``near``, ``far`` and ``white_background``. The model is :class:`~dfa_lightning.models.nerf.NeRF` (or anything
called as ``model(points [R, S, 3], viewdirs [R, 1, 3], network) -> raw [R, S, 4]``).

Per ray: ``coarse_samples`` stratified samples are rendered by the coarse field; with ``fine_samples`` > 0,
that many more are drawn from the coarse weights and all of them are rendered by the fine field. The loss is
``MSE(coarse) + MSE(fine)`` as in NeRF and the DFA paper; ``{stage}/psnr`` is the PSNR of the final (fine) colours,
per batch (in validation and test a batch is one whole view, so the epoch value is the mean PSNR over views, as the
paper reports). The checkpoint monitor is ``val/psnr`` (max).

Evaluation renders without jitter or density noise, as NeRF evaluates. The DFA paper's ``test_nerf.py`` rendered
its test views with the training sampling (jittered samples; density noise 1.0 on LLFF), a quirk not reproduced.

``dual: true`` is the paper's NeRF-Dual (``test_nerf.py --dual-render``; reference/paper.md §2.1), in validation and
test only: the coarse field is evaluated again at the fine samples and its raw output averaged 0.5/0.5 with the fine
field's before volume rendering. Training is unchanged, so a trained checkpoint can be tested both ways.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio

from dfa_lightning.errors import ConfigError
from dfa_lightning.memory import free_bytes, gib, leaf_output_bytes
from dfa_lightning.tasks import volume_rendering as vr
from dfa_lightning.tasks.base import StepOutput, Task


class ViewSynthesis(Task):
    """Args:
        coarse_samples: stratified samples per ray (paper: 64) (default: ``64``).
        fine_samples: importance samples per ray for the fine field; 0: coarse only (paper: 128) (default: ``128``).
        perturb: jitter the training samples within their bins (default: ``True``).
        noise_std: std of the noise added to the density in training (paper: 1.0 on LLFF, 0 on Blender)
            (default: ``0.0``).
        chunk: rays rendered at once in validation and test (bounds their memory) (default: ``4096``).
        dual: validation and test render the mean of both fields' raw outputs at the fine samples (the paper's
            NeRF-Dual; training unchanged) (default: ``False``).
    """

    monitor = "val/psnr"
    monitor_mode = "max"

    def __init__(self, coarse_samples: int = 64, fine_samples: int = 128, perturb: bool = True,
                 noise_std: float = 0.0, chunk: int = 4096, dual: bool = False) -> None:
        if coarse_samples < 2 or fine_samples < 0 or chunk < 1:
            raise ConfigError(f"ViewSynthesis: need coarse_samples >= 2, fine_samples >= 0 and chunk >= 1, got "
                              f"{coarse_samples}, {fine_samples}, {chunk}")
        if fine_samples and coarse_samples < 3:  # the fine samples follow the coarse weights between the ends: none
            raise ConfigError(f"ViewSynthesis: fine_samples > 0 draws from the coarse weights inside the ray, which "
                              f"needs coarse_samples >= 3, got {coarse_samples}")
        if dual and not fine_samples:
            raise ConfigError("ViewSynthesis: `dual: true` averages the coarse and the fine field at the fine samples; "
                              "it needs fine_samples > 0")
        super().__init__()
        self.coarse_samples, self.fine_samples = coarse_samples, fine_samples
        self.perturb, self.noise_std, self.chunk, self.dual = perturb, noise_std, chunk, dual

    def make_metrics(self) -> dict[str, nn.Module]:
        return {"psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2))}

    def render(self, model: nn.Module, rays: torch.Tensor, batch: dict, train: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Colours ``[R, 3]`` of the coarse field and (``fine_samples`` > 0) of the fine field."""
        perturb, noise = (self.perturb, self.noise_std) if train else (False, 0.0)
        near, far, white = float(batch["near"]), float(batch["far"]), bool(batch["white_background"])
        depths = vr.stratified_depths(len(rays), self.coarse_samples, near, far, perturb, rays.device)
        points, viewdirs = vr.sample_points(rays, depths)
        rgb_coarse, weights = vr.composite(model(points, viewdirs, "coarse"), depths, rays[:, 3:6], white, noise)
        if not self.fine_samples:
            return rgb_coarse, None
        extra = vr.importance_depths(depths, weights, self.fine_samples, perturb)
        depths = torch.sort(torch.cat([depths, extra], -1), -1).values
        points, viewdirs = vr.sample_points(rays, depths)
        raw = model(points, viewdirs, "fine")
        if self.dual and not train:
            raw = 0.5 * (raw + model(points, viewdirs, "coarse"))
        rgb_fine, _ = vr.composite(raw, depths, rays[:, 3:6], white, noise)
        return rgb_coarse, rgb_fine

    def check_step_memory(self, model: nn.Module, batch: dict, device: torch.device,
                          forward_context: AbstractContextManager | None = None, probe_rays: int = 256) -> None:
        """Refuse a training batch whose activations alone cannot fit on ``device`` (named with
        ``rays_per_batch``): measured on ``probe_rays`` of its rays, scaled to the batch, without grad (feedback
        hooks already attached, another field's rule, do nothing then); asked by
        :meth:`TaskModule.check_step_memory`. The probe's random draws are forked: the run is unchanged."""
        rays = batch["rays"]
        free = free_bytes(device)
        if free is None or len(rays) <= probe_rays:
            return
        with torch.random.fork_rng(devices=[]), (forward_context or nullcontext()):
            per_ray = leaf_output_bytes(model, lambda: self.render(model, rays[:probe_rays], batch, train=True)
                                        ) / probe_rays
        needed = per_ray * len(rays)
        if needed > free:
            fits = int(free / per_ray) if per_ray else len(rays)
            raise ConfigError(
                f"NeRFDataModule rays_per_batch {len(rays)}: one training step needs at least {gib(needed)} for the "
                f"model's activations ({self.coarse_samples}+{self.fine_samples} samples a ray, "
                f"{per_ray / 1024:.0f} KiB a ray), more than the {gib(free)} free on {device}; lower "
                f"data.init_args.rays_per_batch (below {fits}) or the samples per ray")

    def step(self, model: nn.Module, batch: Any, stage: str) -> StepOutput:
        rays, target = batch["rays"], batch["rgb"]
        if rays.dim() != 2 or rays.shape[-1] != 9 or target.shape != (len(rays), 3):
            raise ConfigError(f"ViewSynthesis: expected rays [R, 9] and rgb [R, 3], got {tuple(rays.shape)} and "
                              f"{tuple(target.shape)} (use NeRFDataModule)")
        if stage == "train":
            coarse, fine = self.render(model, rays, batch, train=True)
        else:  # a whole view: in chunks
            parts = [self.render(model, r, batch, train=False) for r in rays.split(self.chunk)]
            coarse = torch.cat([c for c, _ in parts])
            fine = None if parts[0][1] is None else torch.cat([f for _, f in parts])
        loss = F.mse_loss(coarse, target)
        if fine is not None:
            loss = loss + F.mse_loss(fine, target)
        return StepOutput(loss=loss, output=coarse if fine is None else fine, target=target, batch_size=len(rays))

    def metric_inputs(self, out: StepOutput, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One PSNR per batch (per view in validation and test), clamped colours as NeRF's images."""
        return out.output.detach().clamp(0.0, 1.0).unsqueeze(0), out.target.unsqueeze(0)
