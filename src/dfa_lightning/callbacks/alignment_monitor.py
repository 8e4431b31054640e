"""``AlignmentMonitor``: how well the DFA signals align with the true backprop gradients, logged to TensorBoard.

Every ``every_n_steps`` optimizer steps, on the batch about to be trained, two probe passes run on the unwrapped
model with the same dropout masks: one with the cut (DFA: ``B_i e`` and the resulting weight updates) and one
without (BP: ``∂L/∂h_i`` and its weight updates). Gradients are taken with ``torch.autograd.grad`` (nothing is
written into ``.grad``), the RNG and buffers (BatchNorm statistics) are restored, and it runs on rank 0 only, so
the training trajectory is unchanged. Logged per feedback point:

* ``align/signal_cos/<point>``: mean over samples of cos(B_i e, ∂L/∂h_i) (the paper's Tables A.1 and A.2);
* ``align/update_cos/<point>``: cos between the DFA and BP updates of that point's segment parameters;
* ``align/update_ratio/<point>``: ||DFA update|| / ||BP update||.

With one rule per network (NeRF's coarse and fine fields, several named ``FeedbackAlignmentStrategy``), every rule's
points are measured, each rule with the others left as they are.
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn

from dfa_lightning.callbacks.feedback_alignment import FeedbackAlignmentStrategy
from dfa_lightning.errors import ConfigError


class AlignmentMonitor(pl.Callback):
    """Log DFA-vs-BP alignment per feedback point.

    Args:
        every_n_steps: probe period in optimizer steps (default: ``50``).
        eps: samples whose signal norms are both below ``eps`` are left out of the mean (default: ``1e-12``).
    """

    def __init__(self, every_n_steps: int = 50, eps: float = 1e-12) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ConfigError(f"AlignmentMonitor: every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.eps = eps
        self.last: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Said once: on a run without a DFA rule (a BP or shallow recipe) there is no ``B e`` to compare with the
        gradient, and the monitor logged nothing without a word."""
        rules = [cb for cb in trainer.callbacks if isinstance(cb, FeedbackAlignmentStrategy)]
        if not any(rule.method == "dfa" for rule in rules):
            methods = sorted({rule.method for rule in rules}) or ["no FeedbackAlignmentStrategy"]
            rank_zero_warn(f"AlignmentMonitor: this run's learning rule is {', '.join(methods)}, not dfa: there is no "
                           "feedback signal B e to compare with the backprop gradient, so no align/ metric will be "
                           "logged; add the monitor to a DFA recipe (e.g. recipes/gcn_dfa.yaml)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps or not trainer.is_global_zero:
            return
        if batch_idx % trainer.accumulate_grad_batches:
            return  # once per optimizer step
        strategies = [s for s in _strategies(trainer) if s.method == "dfa"]
        if not strategies:
            return
        self.last = {}
        for strategy in strategies:  # one rule per network (NeRF's coarse and fine): their point names differ
            self.last.update(self.measure(pl_module, strategy, batch))
        for logger in trainer.loggers:  # straight to the loggers: `log_dict(on_step=True)` is kept only at Lightning's
            logger.log_metrics(self.last, step=trainer.global_step)  # log_every_n_steps, which dropped most probes

    @torch.no_grad()
    def measure(self, pl_module: pl.LightningModule, strategy: FeedbackAlignmentStrategy, batch: Any) -> dict[str, float]:
        """Alignment of DFA vs BP on ``batch``; leaves parameters, ``.grad``, buffers and RNG untouched. After a fit
        (whose end took the rule's hooks off the model) the hooks are put back for the measurement only."""
        engine = strategy.engine
        if engine.attached:
            return self._measure(pl_module, strategy, batch)
        engine.attach_hooks()
        try:
            return self._measure(pl_module, strategy, batch)
        finally:
            engine.detach_hooks()

    def _measure(self, pl_module: pl.LightningModule, strategy: FeedbackAlignmentStrategy, batch: Any
                 ) -> dict[str, float]:
        engine, model = strategy.engine, pl_module.model
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # a frozen one has no update
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
            dfa_signal, dfa_update = self._pass(pl_module, engine, batch, params, cut=True)
            torch.set_rng_state(rng[0])
            for d, state in zip(devices, rng[1]):
                torch.cuda.set_rng_state(state, d)
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
            bp_signal, bp_update = self._pass(pl_module, engine, batch, params, cut=False)
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
        out: dict[str, float] = {}
        for point in engine.points:
            name = point.name
            if name in dfa_signal and name in bp_signal:
                out[f"align/signal_cos/{name}"] = self._sample_cos(dfa_signal[name], bp_signal[name], engine)
            seg = [n for n in engine.segments.get(name, []) if dfa_update.get(n) is not None and bp_update.get(n) is not None]
            if seg:
                a = torch.cat([dfa_update[n].flatten() for n in seg]).float()
                b = torch.cat([bp_update[n].flatten() for n in seg]).float()
                out[f"align/update_cos/{name}"] = F.cosine_similarity(a, b, dim=0, eps=self.eps).item()
                out[f"align/update_ratio/{name}"] = (a.norm() / b.norm().clamp_min(self.eps)).item()
        return out

    def _pass(self, pl_module, engine, batch, params, cut: bool):
        """One forward+gradient pass; returns (signal at each point, gradient of every parameter)."""
        engine.capture, engine.enabled = {}, cut
        try:
            with torch.enable_grad():
                loss = pl_module.task.step(pl_module.model, batch, "train").loss
                captured = dict(engine.capture)
                if not engine.segments:
                    engine.record_segments()
                names = [p.name for p in engine.points if p.name in captured and captured[p.name].requires_grad]
                if cut:
                    # B_i e from the error at the output; the DFA update is the engine's own backward
                    (e,) = torch.autograd.grad(loss, captured["__output__"], retain_graph=True)
                    idx = [i for i, p in enumerate(engine.points) if p.name in names]
                    feats = [captured[n] for n in names]
                    signals = engine.project(e, idx, [f.shape for f in feats], [f.dtype for f in feats])
                    # what reaches each point: B_i e through its feedback norm's backward, where it has one
                    modes = [engine.point_norms.get(n, "none") for n in names]
                    signals = [s if m == "none" else
                               torch.autograd.grad(engine.normalise(f, m), f, s, retain_graph=True)[0]
                               for f, s, m in zip(feats, signals, modes)]
                    signal = dict(zip(names, signals))
                    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                else:
                    wrt = [captured[n] for n in names] + list(params.values())
                    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
                    signal = dict(zip(names, grads[: len(names)]))
                    grads = grads[len(names):]
        finally:
            engine.capture, engine.enabled = None, True
            engine.reset()
        return signal, dict(zip(params.keys(), grads))

    def _sample_cos(self, a: torch.Tensor, b: torch.Tensor, engine) -> float:
        from dfa_lightning.feedback.engine import flatten_batch

        a, b = flatten_batch(a, engine.batch_dims).float(), flatten_batch(b, engine.batch_dims).float()
        keep = (a.norm(dim=1) > self.eps) | (b.norm(dim=1) > self.eps)
        if not keep.any():
            return float("nan")
        return F.cosine_similarity(a[keep], b[keep], dim=1, eps=self.eps).mean().item()


def _strategies(trainer: pl.Trainer) -> list[FeedbackAlignmentStrategy]:
    return [cb for cb in trainer.callbacks if isinstance(cb, FeedbackAlignmentStrategy) and cb.engine is not None]
