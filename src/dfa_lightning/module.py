"""``TaskModule``: the one LightningModule of the project; it wraps any ``nn.Module`` and knows nothing of DFA.

The model computes, the :class:`~dfa_lightning.tasks.base.Task` turns a batch into a loss and metrics, the
optimizer is configuration. Whether the update is backprop or DFA is decided only by the callbacks of the recipe.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.utilities import move_data_to_device
from torch import nn

from dfa_lightning.compile import compile_model
from dfa_lightning.errors import ConfigError, NonFiniteLossError
from dfa_lightning.feedback.points import glob_match
from dfa_lightning.probe import first_training_batch, forked_rng, model_device, probe_forward_context
from dfa_lightning.random_state import random_state, restore_random_state
from dfa_lightning.tasks.base import STAGES, BatchMean, Task

GROUPS = "model.param_groups"  # the config key of the optimizer's parameter groups, named in their refusals

def validation_interval(trainer: pl.Trainer) -> int | float | None:
    """``trainer.val_check_interval``, or None for validation on the clock (a time such as "00:01:00:00", which
    Lightning keeps elsewhere, leaving this attribute unset)."""
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return None
    return getattr(trainer, "val_check_interval", None)


def _rates(optimizer: torch.optim.Optimizer) -> list[tuple]:
    """Each group's base learning rate (``initial_lr``: before a scheduler scales it; None in a checkpoint written
    before it was kept) and weight decay."""
    return [(g.get("initial_lr"), g.get("weight_decay")) for g in optimizer.param_groups]


def _rates_differ(saved: tuple, recipe: tuple) -> bool:
    return saved[1] != recipe[1] or (saved[0] is not None and recipe[0] is not None and saved[0] != recipe[0])


# a group's entries that are not the experiment's: its rates (compared on their own, above), and torch's choices of
# implementation, which a checkpoint may carry from another machine
_NOT_SETTINGS = {"params", "lr", "initial_lr", "weight_decay", "foreach", "fused", "capturable", "differentiable"}


def _optimizer_settings(optimizer: torch.optim.Optimizer, scheduled: set[str] = frozenset()
                        ) -> list[dict[str, Any]]:
    """Each group's hyperparameters besides its rates (Adam's betas and eps, SGD's momentum...) and the entries its
    scheduler keeps or moves there (``scheduled``: OneCycleLR's max_lr and cycled momentum)."""
    return [{k: v for k, v in g.items() if k not in _NOT_SETTINGS and k not in scheduled}
            for g in optimizer.param_groups]


def _scheduler_settings(scheduler: Any) -> dict[str, Any]:
    """The arguments a scheduler was made with, as its state keeps them (StepLR's step_size and gamma, a cosine's
    T_max): a resumed fit takes the checkpoint's, whatever the recipe says."""
    names = set(inspect.signature(type(scheduler)).parameters) - {"optimizer", "last_epoch", "verbose"}
    names |= {f"{n}s" for n in names}  # ReduceLROnPlateau keeps min_lr as min_lrs
    return {k: v for k, v in scheduler.state_dict().items()
            if k in names and isinstance(v, (int, float, str, bool, list, tuple))}


def _first_difference(saved: Any, recipe: Any) -> str | None:
    """The first setting whose value differs, as "<name> <checkpoint's> in the checkpoint, <recipe's> in the recipe"
    (a setting on one side only is another optimizer's, told apart before)."""
    saved = saved if isinstance(saved, list) else [saved]
    recipe = recipe if isinstance(recipe, list) else [recipe]
    for then, now in zip(saved, recipe):
        for key in sorted(set(then) | set(now)):
            if key not in then or key not in now:
                continue
            same = then[key] == now[key] or (isinstance(then[key], (list, tuple)) and list(then[key]) == list(now[key]))
            if not same:
                return f"{key} {then[key]!r} in the checkpoint, {now[key]!r} in the recipe"
    return None


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class TaskModule(pl.LightningModule):
    """Train ``model`` on ``task``.

    Args:
        model: any network; data-sized models may expose ``build(**datamodule.model_hints())``.
        task: loss and metrics (node classification, CTR, language modelling...).
        optimizer: e.g. ``{class_path: torch.optim.Adam, init_args: {lr: 0.01}}`` (default: Adam, lr 1e-3).
        lr_scheduler: optional scheduler; ``ReduceLROnPlateau`` monitors ``task.monitor`` (default: ``None``).
        param_groups: per-parameter options by glob, e.g. ``[{params: "conv1.*", weight_decay: 5e-4}]``; the
            remaining parameters form a last group with the optimizer's defaults (default: ``None``).
        check_finite_loss: stop with a one-line error on a NaN/inf loss (costs one sync per step)
            (default: ``True``).
        scheduler_interval: step the scheduler every ``epoch`` or every ``step`` (Noam); ReduceLROnPlateau at
            ``step`` steps after each validation (an integer ``val_check_interval``) (default: ``"epoch"``).
        compile: run the model through ``torch.compile``: ``true``, or its options, e.g. ``{mode: reduce-overhead}``
            (CUDA graphs) or ``{backend: aot_eager}``. The feedback hooks and the engine's autograd Functions trace
            into the graph without a break, so DFA's per-point host work goes with BP's; the setup probe and the
            alignment probe stay eager (default: ``False``).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        check_finite_loss: bool = True,
        scheduler_interval: str = "epoch",
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        self.model, self.task = model, task
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.param_groups = param_groups or []
        self.check_finite_loss = check_finite_loss
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.scheduler_interval = scheduler_interval
        if not isinstance(compile, (bool, dict)):
            raise ConfigError(f"compile must be true, false or torch.compile's options, got {compile!r}")
        self.compile_options: dict[str, Any] | None = ({} if compile is True else dict(compile)) if compile else None
        self._compiled: Callable[..., Any] | None = None  # the compiled call (a function: adds no state_dict keys)
        self._built = False
        # the epoch's mean loss per stage, accumulated on the device (keys "train_": see Task.metrics)
        self.epoch_loss = nn.ModuleDict({f"{stage}_": BatchMean() for stage in STAGES})
        self._logged_this_epoch: set[str] = set()  # stages whose epoch metrics Lightning already holds

    def configure_model(self) -> None:
        """Build layers whose size comes from the data (idempotent; also called by the DFA callback's setup)."""
        if self._built:
            return
        build = getattr(self.model, "build", None)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        hints = getattr(datamodule, "model_hints", None)
        if callable(build) and callable(hints):
            build(**hints())
        self._built = True

    def setup(self, stage: str) -> None:
        if stage == "fit":  # a BP run has no DFA probe to do it first
            self.check_step_memory(self.trainer)

    def check_step_memory(self, trainer: pl.Trainer, batch: Any | None = None) -> None:
        """A task that can size its step (NeRF's rays per batch) refuses a first batch whose activations cannot fit
        on the run's device, or on the device the model is on now (the DFA callback's setup probe runs the whole
        batch there, before Lightning moves the model): on the CPU the kernel's out-of-memory kill was the only
        message. Asked by the CLI before it launches the processes, by each DFA callback before its probe, and by
        this module's ``setup`` (a BP run has no probe): it measures a few hundred rays, so asking again is cheaper
        than remembering for which run it was asked. ``batch`` defaults to the first training batch."""
        check = getattr(self.task, "check_step_memory", None)
        if not callable(check):
            return
        here = model_device(self.model)
        batch = first_training_batch(trainer, here) if batch is None else move_data_to_device(batch, here)
        if batch is None:
            return
        for device in dict.fromkeys((trainer.strategy.root_device, here)):  # measured here, as the run's autocast
            with forked_rng(here):
                check(self.model, batch, device, probe_forward_context(trainer, here))

    @property
    def runner(self) -> nn.Module | Callable[..., Any]:
        """The model as the steps call it: compiled at the first step when ``compile`` is set (after the DFA
        callback's setup has attached its hooks and run its eager probe), else the model itself."""
        if self.compile_options is None:
            return self.model
        if self._compiled is None:
            self._compiled = compile_model(self.model, **self.compile_options)
        return self._compiled

    def forward(self, *args, **kwargs):
        return self.runner(*args, **kwargs)

    # ------------------------------------------------------------------ steps
    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        """One batch: the task's loss, its metrics updated on the device, and as little host work as possible.

        A Lightning ``self.log`` costs about 1 ms of host time (it walks its record of the value), and a small GPU
        step is host-bound, so nothing is logged per step: the epoch values (mean loss, task metrics) are
        torchmetrics accumulated on the device and handed to Lightning once per epoch (:meth:`_log_epoch_metrics`),
        which computes and resets them at the epoch's end; ``train/loss_step`` is logged only on the steps the
        loggers write (every ``log_every_n_steps``). The only host read is the finite-loss check.
        """
        out = self.task.step(self.runner, self._cast_graph_batch(batch), stage)
        if stage == "train" and self.check_finite_loss and not torch.isfinite(out.loss.detach()).all():
            raise NonFiniteLossError(
                f"loss is {out.loss.item()} at epoch {self.current_epoch}, global step {self.global_step}: "
                "training stopped; lower the learning rate or check the inputs (nothing saved from this step)"
            )
        metrics = self.task.update_metrics(out, batch, stage)
        self.epoch_loss[f"{stage}_"].update(out.loss, out.batch_size or 1)
        if self._trainer is not None:
            if stage not in self._logged_this_epoch:
                self._log_epoch_metrics(stage, metrics)
            if stage == "train" and self._loggers_write_this_step():
                self.log("train/loss_step", out.loss.detach(), on_step=True, on_epoch=False,
                         batch_size=out.batch_size)
        return out.loss

    def _cast_graph_batch(self, batch: Any) -> Any:
        """Lightning's precision plugin casts the floating tensors of a batch that is a collection (``precision:
        64`` to double, ``16-true`` to half) but not those inside a graph batch (torch_geometric's ``Data``), where
        the first layer then met float features with double weights; here they get the same cast, on a shallow copy
        (the data module's graph stays as it is). Not a batch-transfer hook: overriding one in the module makes
        Lightning warn on every run with a data module."""
        plugin = self.trainer.precision_plugin if self._trainer is not None else None
        if plugin is None or type(plugin).convert_input is Precision.convert_input:
            return batch  # no cast (32-true, and the mixed precisions, which cast under autocast)
        if callable(getattr(batch, "apply", None)) and callable(getattr(batch, "to_dict", None)):
            batch = copy.copy(batch).apply(plugin.convert_input)
        return batch

    def _log_epoch_metrics(self, stage: str, metrics: dict[str, nn.Module]) -> None:
        """Register this stage's epoch metrics with Lightning (once per epoch: it keeps the metric objects, computes
        them when the epoch ends, synchronised across ranks, and resets them)."""
        loss = "train/loss_epoch" if stage == "train" else f"{stage}/loss"
        prog_bar = stage != "train"
        self.log(loss, self.epoch_loss[f"{stage}_"], on_step=False, on_epoch=True, prog_bar=prog_bar)
        if metrics:
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=prog_bar)
        self._logged_this_epoch.add(stage)

    def _loggers_write_this_step(self) -> bool:
        """Lightning's rule for writing step metrics (``log_every_n_steps``), decided before the step is counted."""
        trainer = self.trainer
        if trainer.fast_dev_run:
            return True
        every = trainer.log_every_n_steps
        return bool(every) and ((self.global_step + 1) % every == 0 or trainer.should_stop)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["random_state"] = random_state()  # see dfa_lightning.random_state
        pending = self._pending_plateau_steps()
        if pending:
            checkpoint["pending_plateau_steps"] = pending

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._saved_random_state = checkpoint.get("random_state")  # installed if a resumed fit starts training
        self._saved_plateau_steps = checkpoint.get("pending_plateau_steps")

    def _pending_plateau_steps(self) -> dict[int, float]:
        """ReduceLROnPlateau steps at an epoch's end after the checkpoints of that epoch are written, and Lightning
        keeps no metric in them: a fit resumed from one lost that step (one rate cut fewer than the straight run).
        Per plateau scheduler still to step this epoch: the metric it will step on."""
        trainer = self._trainer
        if trainer is None or not trainer.training or not trainer.fit_loop.epoch_loop._num_ready_batches_reached():
            return {}
        value = trainer.callback_metrics.get(self.task.monitor)
        pending = {}
        for i, config in enumerate(trainer.lr_scheduler_configs):
            expected = (trainer.current_epoch + 1) // config.frequency
            if config.reduce_on_plateau and config.interval == "epoch" and value is not None \
                    and config.scheduler.last_epoch < expected:
                pending[i] = float(value)
        return pending

    def on_fit_start(self) -> None:
        """A resumed fit continues the checkpoint's random state: its dropout masks and data order then equal the
        uninterrupted run's. Installed here, after the restore, and before the training loader's first iterator is
        made (Lightning makes it before ``on_train_start``; the sanity check between runs with the state isolated)."""
        saved, self._saved_random_state = getattr(self, "_saved_random_state", None), None
        if saved is not None and self.trainer.ckpt_path:
            restore_random_state(saved)

    def on_train_start(self) -> None:
        """A resumed fit continues the checkpoint's optimizer and scheduler: a setting that the recipe (or the
        command line) changed was silently replaced by the checkpoint's. Said here, after the restore and before the
        first step; then the plateau step that the checkpoint's epoch had still to take is taken."""
        recipe = getattr(self, "_recipe_rates", None)
        pending, self._saved_plateau_steps = getattr(self, "_saved_plateau_steps", None), None
        if not self.trainer.ckpt_path or not recipe or len(self.trainer.optimizers) != 1:
            return
        self._check_resumed_settings()
        saved = _rates(self.trainer.optimizers[0])
        if len(saved) != len(recipe) or any(_rates_differ(a, b) for a, b in zip(saved, recipe)):
            group = next((i for i, (a, b) in enumerate(zip(saved, recipe)) if _rates_differ(a, b)), 0)
            raise ConfigError(
                f"fit --ckpt_path {self.trainer.ckpt_path}: the checkpoint's optimizer has (lr, weight_decay) "
                f"{saved[group] if group < len(saved) else saved} in parameter group {group}, the recipe "
                f"{recipe[group] if group < len(recipe) else recipe}; a resumed fit continues the checkpoint's "
                "optimizer, so resume with its settings (a new fit from its weights is another run)")
        for i, value in (pending or {}).items():  # the plateau step the checkpoint's epoch had still to take
            self.trainer.lr_scheduler_configs[int(i)].scheduler.step(value)

    def _check_resumed_settings(self) -> None:
        """The rest of the optimizer and the scheduler, as the rates: changed settings were silently replaced by the
        checkpoint's (betas, momentum, StepLR's gamma), and another optimizer class took the checkpoint's groups and
        died at its first step (SGD: KeyError 'momentum')."""
        optimizer, where = self.trainer.optimizers[0], f"fit --ckpt_path {self.trainer.ckpt_path}"
        scheduled = getattr(self, "_scheduled_keys", frozenset())
        saved, recipe = _optimizer_settings(optimizer, scheduled), getattr(self, "_recipe_settings", None)
        if recipe is not None and [set(g) for g in saved] != [set(g) for g in recipe]:
            extra = sorted(set().union(*saved) - set().union(*recipe))
            raise ConfigError(f"{where}: the checkpoint's optimizer has settings {', '.join(extra) or 'other'} that "
                              f"{type(optimizer).__name__} has not: it was trained with another optimizer; resume "
                              "with the recipe's own (a new fit from its weights is another run)")
        changed = _first_difference(saved, recipe) if recipe is not None else None
        configs = self.trainer.lr_scheduler_configs
        if changed is None and configs and getattr(self, "_recipe_scheduler", None) is not None:
            changed = _first_difference(_scheduler_settings(configs[0].scheduler), self._recipe_scheduler)
        if changed is not None:
            raise ConfigError(f"{where}: {changed}; a resumed fit continues the checkpoint's optimizer and "
                              "scheduler, so resume with its settings (a new fit from its weights is another run)")

    def on_train_epoch_start(self) -> None:
        self._logged_this_epoch.discard("train")

    def on_validation_epoch_start(self) -> None:
        self._logged_this_epoch.discard("val")

    def on_validation_epoch_end(self) -> None:
        """A non-finite validation loss stops the run here, before a checkpoint callback could save these weights as
        the best (one host read per validation epoch)."""
        if (not self.check_finite_loss or self.trainer.sanity_checking or "val" not in self._logged_this_epoch
                or self.trainer.state.fn != "fit"):  # `validate` of a checkpoint reports its loss as it is
            return
        loss = self.epoch_loss["val_"].compute()
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"validation loss is {loss.item()} at epoch {self.current_epoch}, global step {self.global_step}: "
                "training stopped before these weights were checkpointed; the weights or the validation data are "
                "not finite (lower the learning rate or check the inputs)")

    def on_test_epoch_start(self) -> None:
        self._logged_this_epoch.discard("test")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self.task.step(self.runner, batch, "test").output

    # ------------------------------------------------------------------ optimizer
    def _check_group_options(self, optimizer: torch.optim.Optimizer) -> None:
        """A ``param_groups`` option the optimizer does not know (``weight_decy``) would sit in the group unused,
        and a group's own learning rate is not checked by torch (only the default is): both named here."""
        known = set(optimizer.defaults)
        for spec in self.param_groups:
            unknown = sorted(set(spec) - known - {"params"})
            if unknown:
                hint = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
                said = ", ".join(f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hint.items())
                raise ConfigError(f"model.param_groups entry {spec}: {type(optimizer).__name__} has no option {said}; "
                                  f"its options: {', '.join(sorted(known))}", key=GROUPS)
            for key, value in spec.items():
                default = optimizer.defaults.get(key)
                if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                        not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0
                        or math.isinf(value)):
                    raise ConfigError(f"model.param_groups entry {spec}: {key} must be a finite number >= 0, got "
                                      f"{value!r}", key=GROUPS)

    def parameter_groups(self) -> list[dict[str, Any]]:
        named = dict(self.model.named_parameters())
        taken: set[str] = set()
        groups = []
        for spec in self.param_groups:
            spec = dict(spec)
            pattern = spec.pop("params", None)
            if not isinstance(pattern, str):
                raise ConfigError(f"model.param_groups entry {spec} needs `params:` as a glob on parameter names",
                                  key=GROUPS)
            matched = [n for n in named if glob_match(n, pattern)]
            names = [n for n in matched if n not in taken]
            if not matched:
                raise ConfigError(f"model.param_groups pattern {pattern!r} matches no parameter; names: "
                                  f"{', '.join(named)}", key=GROUPS)
            if not names:
                raise ConfigError(f"model.param_groups pattern {pattern!r} matches only parameters an earlier entry "
                                  f"took ({', '.join(matched)}): the first matching entry wins; put the narrower one "
                                  "first", key=GROUPS)
            taken.update(names)
            groups.append({"params": [named[n] for n in names], **spec})
        rest = [p for n, p in named.items() if n not in taken]
        if rest:
            groups.append({"params": rest})
        return groups

    def configure_optimizers(self):
        """The optimizer over ``param_groups``, and its scheduler. A refusal names its setting, and carries its key:
        the CLI also names the recipe (or the command line) that set it."""
        groups = self.parameter_groups()
        try:
            optimizer = self.optimizer(groups)
        except (ValueError, TypeError) as err:  # torch's own checks: "Invalid learning rate: -1.0", LBFGS and groups
            raise ConfigError(f"model.optimizer: {err}", key="model.optimizer") from None
        self._check_group_options(optimizer)
        for group in optimizer.param_groups:  # the base rate, kept in checkpoints (ReduceLROnPlateau keeps none)
            group.setdefault("initial_lr", group["lr"])
        self._recipe_settings, self._recipe_scheduler = _optimizer_settings(optimizer), None
        self._scheduled_keys: set[str] = set()
        if self.lr_scheduler is None:
            self._recipe_rates = _rates(optimizer)
            return optimizer
        try:
            scheduler = self.lr_scheduler(optimizer)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.lr_scheduler: {err}", key="model.lr_scheduler") from None
        for period in ("step_size", "T_max"):  # periods torch takes modulo / divides by unchecked: 0 failed mid-run
            value = getattr(scheduler, period, None)
            if isinstance(value, int) and value < 1:
                raise ConfigError(f"model.lr_scheduler: {type(scheduler).__name__} {period} must be >= 1, got {value}",
                                  key="model.lr_scheduler")
        self._recipe_rates, self._recipe_scheduler = _rates(optimizer), _scheduler_settings(scheduler)
        before = set().union(*self._recipe_settings)  # the scheduler's own entries in the groups, and what it cycles
        self._scheduled_keys = set().union(*_optimizer_settings(optimizer)) - before
        if getattr(scheduler, "cycle_momentum", False):
            self._scheduled_keys |= {"momentum", "betas"}
        self._recipe_settings = _optimizer_settings(optimizer, self._scheduled_keys)
        config = {"scheduler": scheduler, "interval": self.scheduler_interval}
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if plateau and scheduler.mode != self.task.monitor_mode:
            better = "higher" if self.task.monitor_mode == "max" else "lower"
            raise ConfigError(f"model.lr_scheduler: ReduceLROnPlateau's mode is {scheduler.mode!r}, but it steps on "
                              f"{self.task.monitor}, which is {better}-is-better: it would cut the rate while the "
                              f"metric improves; set mode: {self.task.monitor_mode}", key="model.lr_scheduler")
        if plateau:
            config["monitor"] = self.task.monitor
            if self.scheduler_interval == "step":
                config["frequency"] = self._validation_period()
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _validation_period(self) -> int:
        """ReduceLROnPlateau stepped per batch: Lightning steps it every ``frequency`` batches on the logged
        ``val/`` metric; with 1 the first batch, before any validation, stopped the run (the metric "is not
        available"). Its period is the validation's, in batches: one step after each validation."""
        interval = validation_interval(self.trainer)
        if not isinstance(interval, int) or self.trainer.check_val_every_n_epoch is None:
            given = "a time" if interval is None else repr(interval)
            raise ConfigError(f"model.scheduler_interval is step with ReduceLROnPlateau, which steps on "
                              f"{self.task.monitor} after each validation: give trainer.val_check_interval as a "
                              f"number of batches within the epoch (it is {given}), or keep scheduler_interval "
                              "epoch", key="model.scheduler_interval")
        accumulate = self.trainer.accumulate_grad_batches
        if interval % accumulate:  # Lightning steps schedulers only on the batches that step the optimizer
            raise ConfigError(f"model.scheduler_interval is step with ReduceLROnPlateau, which steps after each "
                              f"validation, but trainer.val_check_interval {interval} is not a multiple of "
                              f"trainer.accumulate_grad_batches {accumulate}: the validations that end on an "
                              "accumulating batch would not step it; give a multiple", key="model.scheduler_interval")
        return interval
