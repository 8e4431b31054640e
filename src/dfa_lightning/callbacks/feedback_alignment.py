"""``FeedbackAlignmentStrategy``: the Lightning callback that makes any wrapped model train by DFA.

BP and DFA recipes differ only by this callback (``method: bp`` makes it inert). It builds a
:class:`~dfa_lightning.feedback.engine.FeedbackEngine` in ``setup()``, i.e. before any strategy (DDP) wraps the
model, runs one probe forward to learn the widths, draws ``B`` from its own seeded generator; at ``on_fit_start``
(optimizers built) it settles ``projection: auto`` and prints the report; it stores ``B`` in the checkpoint and
checks that every rank holds the same ``B``.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import zlib
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from dfa_lightning.errors import ConfigError
from dfa_lightning.feedback.engine import FeedbackEngine, check_settings, optimizer_state_bytes
from dfa_lightning.probe import first_training_batch, forked_rng, model_device, modes_kept, probe_forward_context


class FeedbackAlignmentStrategy(pl.Callback):
    """Train the wrapped model with Direct Feedback Alignment (or the shallow control, or plain backprop).

    Args:
        method: ``bp``, ``dfa`` or ``shallow`` (default: ``"dfa"``).
        feedback_points: globs on ``model.named_modules()`` or dotted module types (default: ``[]``).
        output: module whose output gradient is the error e; empty for the model itself (default: ``None``).
        batch_dims: dims sharing one feedback matrix (default: ``[0]``).
        init: ``uniform`` (paper), ``gaussian`` or ``sign`` (default: ``"uniform"``).
        scale: ``per_layer`` 1/sqrt(d_i), ``max_width`` 1/sqrt(max d_i) (paper), ``none`` (default: ``"per_layer"``).
        shared_slices: one matrix whose first d_i columns feed point i, exactly as TinyDFA (default: ``False``).
        seed: seed of the dedicated generator that draws B; ``None`` takes the run's ``seed_everything`` value
            (plus a number derived from ``name`` when given), so a seed sweep also varies B as the paper's code did
            (default: ``None``).
        operator: ``dense`` (paper), ``lowrank`` (``B = UV``, rank ``rank``) or ``sparse`` (``nnz`` non-zeros per
            feedback column): the projection's cost (default: ``"dense"``).
        rank, nnz: sizes of the ``lowrank`` and ``sparse`` operators (default: ``64``, ``16``).
        error: ``exact``, ``sign``, ``ternary`` or ``centered`` (minus its batch mean) error sent through B
            (default: ``"exact"``).
        projection: ``fused``: all ``B_i e`` from one operator call when the backward reaches the output;
            ``per_point``: ``e`` is prepared once and each ``B_i e`` is computed when the backward reaches point i,
            so only one feedback signal is alive at a time (the same FLOPs, plus ``receiver``'s thin forward
            matmuls where it picks them; peak memory ≈ BP's); ``auto``: measured on
            the probe batch at setup, fused unless its signals would add more than 10% to the step's memory,
            optimizer state included (default: ``"auto"``).
        projection_dtype: ``float32`` (the projection in fp32 whatever the precision) or ``gradient`` (in the
            error's dtype: bf16/fp16 under AMP, several times faster on tensor cores for a wide error, e.g. after a
            large vocabulary) (default: ``"float32"``).
        receiver: per point, how ``B_i e`` reaches point i in an eager step: ``token`` (an autograd Function per
            point), ``matmul`` (one thin forward matmul per point whose backward, autograd's own, computes ``B_i e``:
            no Python in the backward), ``auto``: matmul when those matmuls add at most 2% to the step's matmul FLOPs
            (measured on the probe batch); compiled or CUDA-graph-captured steps always use tokens (default:
            ``"auto"``).
        feedback_norm: ``none``, ``layer`` or ``orthogonal``: ``layer``: ``B_i e`` reaches each point through
            the backward of a parameter-free LayerNorm of its output (centred, radial component removed, divided
            by the output's scale), as a post-LN block's own norm passes it on; ``orthogonal``: the same without
            dividing by the scale. For points whose downstream is scale-invariant (pre-LN streams, blocks before a
            BatchNorm), not plain stacks. A mapping ``{point glob: mode}`` sets it per point (first matching glob;
            unmatched points: ``none``), e.g. ``{"blocks.*.ffn.act": orthogonal}`` (default: ``"none"``).
        verbose: print the placement report at fit start (default: ``True``).
        name: tells several instances apart, e.g. one per network of NeRF's coarse/fine pair, each with its own
            ``output``, points and B; it keys the instance's state in checkpoints (default: ``None``: one instance).
    """

    def __init__(
        self,
        method: str = "dfa",
        feedback_points: list[str] | None = None,
        output: str | None = None,
        batch_dims: list[int] | None = None,
        init: str = "uniform",
        scale: str = "per_layer",
        shared_slices: bool = False,
        seed: int | None = None,
        operator: str = "dense",
        rank: int = 64,
        nnz: int = 16,
        error: str = "exact",
        projection: str = "auto",
        projection_dtype: str = "float32",
        receiver: str = "auto",
        feedback_norm: str | dict[str, str] = "none",
        verbose: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if method == "fa":
            raise ConfigError("method 'fa' (layer-to-layer feedback alignment) is not implemented; use dfa, shallow or bp")
        if method in ("dfa", "shallow") and not feedback_points:
            raise ConfigError(f"method {method!r} needs `feedback_points` (module-name globs or module types)")
        self._point_specs = list(feedback_points or [])  # types as given: a class local to a notebook matches too
        self.config = dict(  # what checkpoints keep: types as their dotted names (weights_only loads no classes)
            method=method, feedback_points=[_spec_name(p) for p in self._point_specs], output=output,
            batch_dims=list(batch_dims) if batch_dims is not None else [0], init=init, scale=scale,
            shared_slices=shared_slices, seed=seed,
            operator=operator, rank=rank, nnz=nnz, error=error, projection=projection,
            projection_dtype=projection_dtype, receiver=receiver, feedback_norm=feedback_norm,
        )
        try:  # now, while the recipe is read: not after a run folder and the model exist
            check_settings(**self.config)
        except ConfigError as err:
            raise ConfigError(f"FeedbackAlignmentStrategy{f' {name!r}' if name else ''}: {err}") from None
        for key, value, user in (("rank", rank, "lowrank"), ("nnz", nnz, "sparse")):
            if operator != user and value != inspect.signature(type(self)).parameters[key].default:
                rank_zero_warn(f"FeedbackAlignmentStrategy: {key} {value} is read by operator: {user} only; this "
                               f"rule's operator is {operator}, so it has no effect")
        self.seed_given = seed is not None
        self.verbose = verbose
        self.name = name
        self.engine: FeedbackEngine | None = None
        self._loaded: dict[str, torch.Tensor] | None = None
        self._awaiting_first_forward = False  # the probe left a point unsized: check it ran once training ran
        self._fitting = True  # set by setup(); a checkpoint loaded outside fit is not checked against the recipe

    @property
    def state_key(self) -> str:
        """The checkpoint key of this instance's B: the class name, with ``name`` when several are used."""
        return self.__class__.__qualname__ if self.name is None else self._generate_state_key(name=self.name)

    @property
    def method(self) -> str:
        return self.config["method"]

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"  # setup runs before Lightning restores a checkpoint into the callbacks
        if stage != "fit":
            return  # evaluation needs no feedback (after a fit, its hooks have left the model)
        if self.engine is not None:
            if self.engine.model is pl_module.model:
                self.engine.attach_hooks()  # another fit of the same network: its B carries on
                return
            self.engine.detach_hooks()  # this rule reused for another network (a loop over models): its own B
            self.engine, self._loaded = None, None
        with self._refusals_named():
            self._attach(trainer, pl_module)

    @contextlib.contextmanager
    def _refusals_named(self):
        """A refusal of this rule's settings raised once the run has begun (a point that matches nothing, a width
        that changes) names the rule, and carries its config key: the CLI also names the recipe (or the command
        line) that set it."""
        try:
            yield
        except ConfigError as err:
            if err.key is not None or not _raised_by_the_rule(err):  # the data's, the task's: not this rule's
                raise
            rule = type(self).__name__ + (f" {self.name!r}" if self.name is not None else "")
            raise ConfigError(f"{rule}: {err}", key="trainer.callbacks") from err

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The engine on the model: points resolved, widths probed on one batch, B drawn (or the checkpoint's)."""
        self.check_strategy(trainer)
        pl_module.configure_model()  # data-sized models are built before the points are resolved
        check_memory = getattr(pl_module, "check_step_memory", None)
        if self.method != "bp" and callable(check_memory):  # before the probe runs the whole first batch
            check_memory(trainer)  # (BP has no probe: the module's setup asks)
        if not self.seed_given:  # identical on every rank: seed_everything exports it to each process
            self.config["seed"] = int(os.environ.get("PL_GLOBAL_SEED", 0))
            if self.name is not None:  # named instances (NeRF's coarse and fine) draw different B from one run seed
                self.config["seed"] += zlib.crc32(self.name.encode()) % 1_000_003
        for stale in attached_engines(pl_module.model):  # a rule left on this model by an earlier fit (a notebook
            if getattr(stale, "owner", None) == self.state_key:  # reusing it): one rule per network at a time
                stale.detach_hooks()
        self.engine = FeedbackEngine(pl_module.model, **{**self.config, "feedback_points": self._point_specs})
        self.engine.owner = self.state_key
        self._check_points_unclaimed(pl_module.model)
        if self.method == "bp":
            return
        self._probe(trainer, pl_module)
        if self._loaded is not None:
            self.engine.load_feedback_state(self._loaded)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The hooks leave the model with the fit: a later fit of it without this rule (a BP Trainer beside it in a
        notebook) trained by DFA. Its B stays, for another fit with this rule (which attaches them again)."""
        if stage == "fit" and self.engine is not None:
            self.engine.detach_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A fit that raised (a NaN loss) ends without ``teardown``: its hooks leave the model here."""
        if self.engine is not None:
            self.engine.detach_hooks()

    def check_strategy(self, trainer: pl.Trainer) -> None:
        """``shallow`` under DDP that does not look for unused parameters: the layers below the points get no
        gradient, and DDP stopped both ranks with a traceback after the first step. The CLI asks before it launches
        the processes (one message, not one per rank); ``setup`` asks again for a Trainer built in code."""
        strategy = trainer.strategy
        if (self.method == "shallow" and isinstance(strategy, DDPStrategy)
                and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters")):
            raise ConfigError("method shallow trains only the layers above the last point: the others get no "
                              "gradient, which plain DDP stops at after the first step; use --trainer.strategy "
                              "ddp_find_unused_parameters_true")

    def _check_points_unclaimed(self, model: nn.Module) -> None:
        """Two rules on one point (NeRF's coarse and fine rules with overlapping globs): the second skipped it, and
        its report counted the layers below as trained by backprop, where the first rule's B e trains them."""
        mine = {p.name for p in self.engine.points}
        for other in attached_engines(model):
            shared = sorted(mine & {p.name for p in other.points}) if other is not self.engine else []
            if shared:
                self.engine.detach_hooks()
                raise ConfigError(f"feedback point(s) {', '.join(shared)} belong to two rules ({other.owner} and "
                                  f"{self.state_key}): a point receives one rule's feedback; give each rule its own")

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One forward on a real batch (eval mode, RNG untouched) to learn widths and segments, then draw B."""
        engine, model = self.engine, pl_module.model
        device = model_device(model)  # the CPU, unless the user moved the model: Lightning moves it after setup
        batch = first_training_batch(trainer, device)  # widths, auto choice, one B on every rank
        if batch is None:
            self._awaiting_first_forward = True  # widths are learnt at the first training forward; B is still
            return  # drawn from the seed
        engine.capture = {}
        try:
            with forked_rng(device), torch.enable_grad(), modes_kept(model):
                model.eval()
                with probe_forward_context(trainer, device):  # the run's autocast: activations' true size
                    engine.calibrate(lambda: pl_module.task.step(model, batch, "train"))
                engine.record_segments()
        finally:
            engine.capture = None
            engine.reset()
        if engine.ready:  # else a point the eval-mode probe did not see (one that runs in training only): B is
            engine.ensure_matrix()  # drawn at the first training forward, from the same seed
        else:
            self._awaiting_first_forward = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is None or self.method == "bp":
            return
        if self.engine.calibration is not None:  # the optimizers exist now: count their state in the auto choice
            self.engine.count_optimizer_state(optimizer_state_bytes(trainer.optimizers))
        self.engine.warm(pl_module.device)  # the model is on its device now: B's copy there, before any step
        if self.verbose:
            rank_zero_info(self.engine.report() if self.name is None else f"[{self.name}] {self.engine.report()}")
        if self.engine.operator is not None and trainer.world_size > 1:
            self._assert_same_matrix_on_every_rank(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.engine is not None:
            self.engine.reset()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss) -> None:
        """After the first training forward every point has run: one the eval-mode probe did not see waited for
        it. A point that never runs (a rule for NeRF's fine field with ``fine_samples: 0``) would leave the rule
        silently doing nothing."""
        if self._awaiting_first_forward and self.engine is not None:
            self._awaiting_first_forward = False
            missing = [p.name for p in self.engine.points if p.width is None]
            if missing:
                raise ConfigError(f"{self.state_key}: feedback point(s) never ran in a training forward: "
                                  f"{', '.join(missing)} (a module the forward does not call, or one it calls only "
                                  "after the output module)", key="trainer.callbacks")

    def _assert_same_matrix_on_every_rank(self, trainer: pl.Trainer) -> None:
        digest = torch.tensor([feedback_checksum(self.engine.feedback_state())], dtype=torch.float64,
                              device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(digest).flatten().tolist()
        if len(set(gathered)) != 1:
            raise RuntimeError(f"feedback matrices differ across ranks (checksums {gathered}); DDP would average "
                               "updates made with different B")

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        state = self.engine.feedback_state() if self.engine is not None else self._loaded
        return {"config": dict(self.config), "feedback": None if state is None else {k: v.clone() for k, v in state.items()}}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        """Resuming a fit: a checkpoint whose feedback state sits under another rule's key (a rule renamed, or
        a named rule resumed unnamed) would leave this rule's B drawn afresh, with only Lightning's note that a
        callback is missing."""
        saved = [k for k in checkpoint.get("callbacks", {}) if k.startswith(type(self).__qualname__)]
        if self._fitting and saved and self.state_key not in saved:
            raise ConfigError(f"the checkpoint holds the feedback state of {saved}, and this run's rule is "
                              f"{self.state_key!r} (its `name` differs): resume with the recipe it was trained with")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {})
        # only training uses B: `test`/`validate`/`predict` from a checkpoint accept any feedback settings (the run's
        # seed, which a rule with `seed: null` has not even resolved outside fit)
        if self._fitting and saved.get("method", self.method) != self.method:  # one run, one learning rule
            raise ConfigError(f"the checkpoint was trained by {saved['method']} and this recipe trains by "
                              f"{self.method}: resume with the recipe it was trained with (a checkpoint's weights "
                              "under another rule are a new run: `test --ckpt_path` scores them)")
        if self._fitting and saved.get("method") == self.method and self.method in RESUME_KEYS:
            keys = RESUME_KEYS[self.method]
            then, now = _in_effect(saved), _in_effect(self.config)
            changed = sorted(k for k in keys if k in then and then.get(k) != now.get(k))
            if changed:
                why = (f" (this rule's seed, {self.config['seed']}, comes from seed_everything; the checkpoint's was "
                       f"{saved.get('seed')})" if "seed" in changed and not self.seed_given else "")
                raise ConfigError(f"the checkpoint was trained with other feedback settings: {changed}{why}; "
                                  "resume with the recipe it was trained with")
        if not self._fitting and saved.get("operator", "dense") != self.config["operator"]:
            return  # a scored checkpoint of another operator: its B cannot serve this rule (it was a KeyError)
        # outside fit too (`test(ckpt_path=...)` in a notebook): the weights loaded are the checkpoint's, and a fit
        # that follows goes on with the B they were trained with
        self._loaded = state_dict.get("feedback")
        if self.engine is not None and self._loaded is not None and self.method == "dfa":
            self.engine.load_feedback_state(self._loaded)


# What a resumed fit must share with its checkpoint: under DFA every setting that shapes B or the signal through it;
# under shallow the points and the output, which decide the layers that train.
RESUME_KEYS = {
    "dfa": ("feedback_points", "output", "init", "scale", "shared_slices", "seed", "operator", "rank", "nnz", "error",
            "feedback_norm", "batch_dims"),
    "shallow": ("feedback_points", "output"),
}


def _raised_by_the_rule(err: BaseException) -> bool:
    """Whether ``err`` was raised by this package's feedback code (the engine, the points, this callback) rather than
    by the data, the task or the model, which the rule's setup also runs (the probe's forward)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename) if tb is not None else None
    return path is not None and (path.parent.name == "feedback" or path.name == Path(__file__).name)


def _in_effect(config: dict[str, Any]) -> dict[str, Any]:
    """A rule's settings as they act, for the resume check: points in any order (they resolve in the model's order),
    a ``feedback_norm`` mapping in its order (the first matching glob wins: reordered, the points' norms change),
    ``rank`` and ``nnz`` only under the operator that reads them."""
    view = dict(config)
    view["feedback_points"] = sorted(map(str, config.get("feedback_points") or []))
    if isinstance(config.get("feedback_norm"), dict):
        view["feedback_norm"] = list(config["feedback_norm"].items())
    for key, reader in (("rank", "lowrank"), ("nnz", "sparse")):
        if config.get("operator", "dense") != reader:
            view.pop(key, None)
    return view


def _spec_name(spec: str | type) -> str:
    """A feedback point as the checkpoint keeps it: a type by its dotted path (``torch.nn.modules.activation.Tanh``),
    which ``torch.load(weights_only=True)`` reads, where the class object made every checkpoint unloadable."""
    return f"{spec.__module__}.{spec.__qualname__}" if isinstance(spec, type) else spec


def attached_engines(model: nn.Module) -> list[FeedbackEngine]:
    """The engines whose hooks are on ``model`` (found through their output hook, a bound method)."""
    found: list[FeedbackEngine] = []
    for module in model.modules():
        for hook in module._forward_hooks.values():
            engine = getattr(hook, "__self__", None)
            if isinstance(engine, FeedbackEngine) and not any(engine is e for e in found):
                found.append(engine)
    return found


def feedback_checksum(state: dict[str, torch.Tensor] | None) -> float:
    """A cheap exact fingerprint of B (CRC32 of its bytes), comparable across ranks."""
    crc = 0
    for key in sorted(state or {}):
        crc = zlib.crc32(state[key].detach().cpu().contiguous().numpy().tobytes(), crc)
    return float(crc)
