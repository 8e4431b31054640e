"""The DFA engine: cut the graph at feedback points, inject B_i·e, all inside ONE autograd pass.

Direct Feedback Alignment (Nøkland 2016; Launay et al. 2020, https://arxiv.org/abs/2006.12878): a hidden layer
receives ``δh_i = B_i e`` instead of ``∂L/∂h_i``, with ``e = ∂L/∂ŷ`` the error at the output and ``B_i`` fixed and
random. Inside a block, gradients still flow locally (activation derivative, dropout, norms, attention).

How it is done, with forward hooks only (the model's code is never edited):

* each feedback point's output ``h_i`` is recorded and replaced by ``h_i.detach()`` for the layers above, so
  autograd computes no gradient with respect to it from above (nothing that DFA would throw away);
* the output ``ŷ`` is routed through :class:`_InjectFeedback`, an identity whose inputs are ``ŷ`` and every
  recorded ``h_i``. Its backward receives ``e``, computes all projections with one matmul ``e @ M`` (fp32 by
  default) and returns them as the gradients of the ``h_i``; autograd then continues into each block in the same
  pass.

* ``projection="per_point"``: each point instead feeds the injector a zero-stride token made by
  :class:`_ReceiveFeedback`; the injector's backward prepares ``e`` once and hands it to every token, and each
  token's backward, which autograd runs right before its point's segment, returns ``B_i e``: one signal alive at a
  time, and no state outside autograd, so ``torch.compile`` traces both modes. In an eager step, where a token's
  Function costs host time, a point can instead hand the injector ``z_i = h_i M_i^T`` (a *matmul receiver*,
  ``M_i`` its block of the operator): autograd's own matmul backward then turns the prepared error into ``B_i e``,
  with no Python in the backward (see ``receiver``).

Hence DDP buckets, AMP loss scaling, gradient accumulation and clipping see ordinary gradients.

Shapes:
    output ``ŷ``: ``[*batch, *out]`` -> ``e``: ``[N, d_out]`` with ``N = prod(batch)``, ``d_out = prod(out)``
    point ``h_i``: ``[*batch, *feat_i]`` -> ``[N, d_i]``; ``M``: ``[d_out, K]``
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from dfa_lightning.errors import ConfigError
from dfa_lightning.feedback import matrices, operators
from dfa_lightning.feedback.points import glob_match, resolve_output, resolve_points

METHODS = ("bp", "dfa", "shallow")
PROJECTIONS = ("auto", "fused", "per_point")
PROJECTION_DTYPES = ("float32", "gradient")
RECEIVERS = ("auto", "token", "matmul")
FEEDBACK_NORMS = ("none", "layer", "orthogonal")
AUTO_FUSED_BUDGET = 0.10  # projection="auto": fused while its signals add at most this fraction to a step's memory
# receiver="auto": matmul receivers while their forward matmuls add at most this fraction to the step's matmul FLOPs
# (a BP step: 3x the forward's), or at most RECEIVER_FREE_FLOPS per point (below it a matmul costs less host time
# than the ~25 us of Python a token's autograd Function costs on a CPU)
RECEIVER_FLOP_BUDGET = 0.02
RECEIVER_FREE_FLOPS = 1_000_000
# tensors of optimizer state per parameter, for optimizers whose (lazy) state does not exist yet
OPTIMIZER_STATES = {"Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adadelta": 2, "Adagrad": 1,
                    "RMSprop": 1, "SGD": 0, "ASGD": 2, "Rprop": 2, "LBFGS": 0}


def flatten_batch(t: torch.Tensor, batch_dims: Sequence[int]) -> torch.Tensor:
    """``[..]`` -> ``[N, d]``: batch dims moved to the front and merged, the rest merged into features."""
    nb = len(batch_dims)
    if nb == 1 and t.dim() == 2 and batch_dims[0] == 0:  # already [N, d]: the common case, once per step
        return t
    if tuple(batch_dims) != tuple(range(nb)):
        t = t.movedim(tuple(batch_dims), tuple(range(nb)))
    return t.reshape(math.prod(t.shape[:nb]), -1)


def unflatten_batch(flat: torch.Tensor, shape: torch.Size, batch_dims: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`flatten_batch` for a tensor that had ``shape``."""
    nb = len(batch_dims)
    if tuple(batch_dims) == tuple(range(nb)):
        return flat if flat.shape == shape else flat.reshape(shape)
    moved = [shape[d] for d in batch_dims] + [s for i, s in enumerate(shape) if i not in batch_dims]
    return flat.reshape(moved).movedim(tuple(range(nb)), tuple(batch_dims))


@dataclass
class PointInfo:
    name: str
    module: nn.Module
    width: int | None = None


@dataclass
class _Pending:
    """Points recorded since the output module last ran (one entry per point call)."""

    index: list[int] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)  # fused: the point outputs; per point: the receivers
    kind: str = "fused"  # fused | token | matmul: decided at this forward's first point (per point needs B)
    batches: list[tuple[int, ...]] = field(default_factory=list)  # over several batch_dims: each point's sizes

    def clear(self) -> None:
        self.index.clear()
        self.tensors.clear()
        self.batches.clear()
        self.kind = "fused"


def check_settings(method: str = "dfa", init: str = "uniform", scale: str = "per_layer", operator: str = "dense",
                   error: str = "exact", projection: str = "auto", projection_dtype: str = "float32",
                   receiver: str = "auto", feedback_norm: str | Mapping[str, str] = "none", rank: int = 64,
                   nnz: int = 16, batch_dims: Sequence[int] = (0,), feedback_points: Sequence | None = None,
                   **_: Any) -> None:
    """Every choice-valued setting is one of its choices: a :class:`ConfigError` naming the setting otherwise. The
    Lightning callback calls it when the recipe is read, before any run folder or model is made."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if method != "bp" and feedback_points is not None and not feedback_points:
        raise ConfigError(f"method {method!r} needs feedback_points (module-name globs or module types)")
    if init not in matrices.INITS:
        raise ConfigError(f"init must be one of {matrices.INITS}, got {init!r}")
    if scale not in matrices.SCALES:
        raise ConfigError(f"scale must be one of {matrices.SCALES}, got {scale!r}")
    if operator not in operators.OPERATORS:
        raise ConfigError(f"operator must be one of {operators.OPERATORS}, got {operator!r}")
    if error not in operators.ERRORS:
        raise ConfigError(f"error must be one of {operators.ERRORS}, got {error!r}")
    if projection not in PROJECTIONS:
        raise ConfigError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if projection_dtype not in PROJECTION_DTYPES:
        raise ConfigError(f"projection_dtype must be one of {PROJECTION_DTYPES}, got {projection_dtype!r}")
    if receiver not in RECEIVERS:
        raise ConfigError(f"receiver must be one of {RECEIVERS}, got {receiver!r}")
    if operator == "lowrank" and int(rank) < 1:
        raise ConfigError(f"rank must be >= 1 for the lowrank operator, got {rank}")
    if operator == "sparse" and int(nnz) < 1:
        raise ConfigError(f"nnz must be >= 1 for the sparse operator, got {nnz}")
    if not batch_dims or any(int(d) < 0 for d in batch_dims) or len(set(batch_dims)) != len(batch_dims):
        raise ConfigError(f"batch_dims must list distinct sample dims (>= 0) of the output, e.g. [0] or [0, 1] for "
                          f"[batch, tokens, features], got {list(batch_dims)}")
    modes = feedback_norm.values() if isinstance(feedback_norm, Mapping) else [feedback_norm]
    if not all(isinstance(m, str) and m in FEEDBACK_NORMS for m in modes):
        raise ConfigError(f"feedback_norm must be one of {FEEDBACK_NORMS} or a mapping of point globs to one of "
                          f"them, got {feedback_norm!r}")


class _InjectFeedback(torch.autograd.Function):
    """Identity on the output; backward sends ``B_i e`` to every recorded point in the same autograd pass."""

    @staticmethod
    def forward(ctx, engine: "FeedbackEngine", index: tuple[int, ...], kind: str, output: torch.Tensor,
                *inputs: torch.Tensor):
        ctx.engine, ctx.index, ctx.kind = engine, index, kind
        ctx.shapes = [t.shape for t in inputs]
        ctx.dtypes = [t.dtype for t in inputs]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.kind == "fused":  # every B_i e from one operator call
            grads = ctx.engine.project(grad_output, ctx.index, ctx.shapes, ctx.dtypes)
        else:  # per point: the prepared error, one tensor for every receiver, which projects its own slice
            prepared = ctx.engine.prepare_error(grad_output, shared_product=ctx.kind == "token")
            ctx.engine.check_tokens(prepared, ctx.index, ctx.shapes)
            grads = [prepared] * len(ctx.index)
        return (None, None, None, grad_output, *grads)


class _ReceiveFeedback(torch.autograd.Function):
    """``projection="per_point"``: a token created at point i (so autograd runs its backward right before the
    point's segment, as it would the layer above). Forward: a zero-stride ``[rows, width]`` tensor that the output's
    injector takes as an input (no memory). Backward: the injector hands it the prepared error; it returns
    ``B_i e`` as the point's gradient. No state outside autograd, so ``torch.compile`` traces it."""

    @staticmethod
    def forward(ctx, engine: "FeedbackEngine", index: int, rows: int, width: int, dtype: torch.dtype,
                point: torch.Tensor):
        ctx.engine, ctx.index = engine, index
        ctx.shape, ctx.dtype = point.shape, point.dtype
        return point.new_zeros((), dtype=dtype).expand(rows, width)

    @staticmethod
    def backward(ctx, prepared: torch.Tensor):
        return None, None, None, None, None, ctx.engine.project_point(prepared, ctx.index, ctx.shape, ctx.dtype)


class FeedbackEngine:
    """Attach DFA (or the shallow control) to any ``nn.Module`` via hooks; framework-free, so tests can drive it.

    Args:
        model: the network; its code is not touched.
        feedback_points: globs on ``named_modules()`` or dotted module types (e.g. ``["mlp.*", "torch.nn.ReLU"]``).
        method: ``dfa`` (direct feedback), ``shallow`` (cut, no feedback: only layers above the last point train)
            or ``bp`` (nothing attached) (default: ``"dfa"``).
        output: module whose output gradient is the error ``e``; ``None`` for the model itself (default: ``None``).
        batch_dims: dimensions that share one feedback matrix, e.g. ``[0]`` rows/nodes, ``[0, 1]`` (batch, token)
            (default: ``[0]``).
        init, scale, shared_slices, seed: how ``B`` is drawn, see :mod:`dfa_lightning.feedback.matrices`.
        operator, rank, nnz, error: the projection ``dense``/``lowrank``/``sparse`` and the error transform
            ``exact``/``sign``/``ternary``, see :mod:`dfa_lightning.feedback.operators`.
        projection: ``fused``: all ``B_i e`` from ONE operator call when the backward reaches the output (all
            signals alive at once: ``N x K`` extra memory at the backward's start); ``per_point``: the error is
            prepared once (``e``, or ``e U`` for lowrank) and each ``B_i e`` is computed when autograd reaches point
            i, right before its segment, so one signal is alive at a time (peak memory as BP; one matmul per
            point, the same FLOPs, plus the matmul receivers' thin forward matmuls, see ``receiver``); ``auto``: fused unless :meth:`calibrate` finds that the fused signals would add
            more than 10% to the step's memory (activations saved for backward + parameters + gradients + optimizer
            state), then per_point (default: ``"auto"``).
        projection_dtype: ``float32``: the projection runs in fp32 whatever the training precision (fp64 stays
            fp64); ``gradient``: in the dtype of the error (bf16/fp16 under AMP) (default: ``"float32"``).
        receiver: per point, how ``B_i e`` reaches point i in an eager step. ``token``: a zero-stride token whose
            autograd Function projects the slice (no extra work, about 25 µs of Python per point and step);
            ``matmul``: the forward computes ``z_i = h_i M_i^T`` with ``M_i`` the point's block of the operator
            (``B_i``, or ``V_i`` for lowrank), and the output hands ``z_i`` the prepared error, so autograd's own
            matmul backward computes ``B_i e``: no Python in the backward, at the cost of one thin forward matmul
            per point (``N·d_i·w`` multiply-adds, ``w`` the prepared error's width: ``d_out``, or ``r``) whose
            value is discarded; ``auto``: matmul when :meth:`calibrate` finds that those matmuls add at most 2 % to
            the step's matmul FLOPs (or at most 1 MFLOP per point), else token. A compiled step (``torch.compile``)
            or one captured in a CUDA graph always uses tokens: it has no Python to save. The sparse operator always
            uses tokens (default: ``"auto"``).
        feedback_norm: ``none``: ``B_i e`` is the point's gradient; ``layer``: it arrives through the backward of
            a parameter-free LayerNorm of the point's output over its features (centred across features, its
            component along the normalised output removed, divided by the output's per-sample scale), what a
            post-LN block's own LayerNorm does to the signal; the forward is unchanged. Why: at a point on an
            unnormalised stream (pre-LN residual), ``B_i e`` keeps its scale however large the stream grows,
            while the true gradient there shrinks with it; ``orthogonal``: the same backward without the
            ``1/scale`` (centred, the component along the centred output removed; ``B_i e`` keeps its scale). The
            removed component is the one that grows or shrinks the point's output: the true gradient has none where
            what follows is scale-invariant (a LayerNorm or BatchNorm downstream), and removing it is what rescues
            DFA there; on a plain stack it freezes the activations' scale at its initial value (measured: README,
            "Where DFA fails"). A mapping ``{point glob: mode}`` sets it per point (the first glob that matches a
            point wins; points no glob matches get ``none``), e.g. ``{"blocks.*.ffn.act": "orthogonal"}`` for the
            only unnormalised points of a post-LN micro placement (default: ``"none"``).
    """

    def __init__(
        self,
        model: nn.Module,
        feedback_points: Sequence[str | type] = (),
        method: str = "dfa",
        output: str | None = None,
        batch_dims: Sequence[int] = (0,),
        init: str = "uniform",
        scale: str = "per_layer",
        shared_slices: bool = False,
        seed: int = 0,
        operator: str = "dense",
        rank: int = 64,
        nnz: int = 16,
        error: str = "exact",
        projection: str = "auto",
        projection_dtype: str = "float32",
        receiver: str = "auto",
        feedback_norm: str | Mapping[str, str] = "none",
    ) -> None:
        check_settings(method=method, init=init, scale=scale, operator=operator, error=error, projection=projection,
                       projection_dtype=projection_dtype, receiver=receiver, feedback_norm=feedback_norm, rank=rank,
                       nnz=nnz, batch_dims=batch_dims, feedback_points=feedback_points)
        self.feedback_norm = dict(feedback_norm) if isinstance(feedback_norm, Mapping) else feedback_norm
        self.point_norms: dict[str, str] = {}  # point name -> its feedback_norm mode
        if receiver == "matmul" and operator == "sparse":
            raise ConfigError("receiver 'matmul' needs a dense or lowrank operator (the sparse one uses tokens)")
        self.projection, self.projection_dtype, self.receiver_choice = projection, projection_dtype, receiver
        self.calibration: dict[str, float | int | str] | None = None  # projection="auto": what calibrate() measured
        self._rows: int | None = None  # rows N of the output, recorded by the forward that calibrate() runs
        self._batch_shape: tuple[int, ...] | None = None  # the output's sizes over batch_dims, with _rows
        self._bare_top: int | None = None  # calibrate()'s forward: a point with nothing trainable above it
        self._projection_itemsize = 4  # bytes per projected value (see compute_dtype)
        self.operator_kind, self.rank, self.nnz, self.error = operator, int(rank), int(nnz), error
        self.model, self.method = model, method
        self.batch_dims = tuple(int(d) for d in batch_dims)
        self.init, self.scale, self.shared_slices, self.seed = init, scale, shared_slices, int(seed)
        self.enabled = True  # False: hooks pass everything through (BP), used by the alignment probe
        self.capture = None  # when a dict: raw point outputs (each point's last call) and "__output__"
        self.calls: dict[str, int] = {}  # calls per forward of each point, from the probe (record_segments)
        self.tied: list[str] = []  # parameters both below a point and above the last one (tied embeddings)
        self._calibrating = False  # calibrate()'s forward runs: points that run without grad are noted
        self._no_grad_points: set[str] = set()
        self.points: list[PointInfo] = []
        self.output_name = ""
        self.d_out: int | None = None
        self.operator: operators.FeedbackOperator | None = None  # B, fp32 on CPU (the checkpointed copy)
        self._deferred_state: tuple[dict[str, torch.Tensor], str | None] | None = None  # a checkpoint's B, pending
        # per point: each token carries the prepared error, [rows, _token_width] in _token_dtype (None: no B yet)
        self._token_width: int | None = None
        self._output_dtype: torch.dtype | None = None
        self._token_dtype = torch.float32
        self._warm: tuple | None = None
        self._cuts: dict[int, tuple[str, torch.Tensor]] | None = None  # calibrate's forward: what points hand on
        self._receivers: list[torch.Tensor] = []  # matmul receivers: M_i^T [d_i, w] per point, on _warm's device
        self._post_scales: tuple[float, ...] | None = None
        self._layout: matrices.FeedbackLayout | None = None
        self._pending = _Pending()
        self._handles: list = []
        self.owner: str | None = None  # the Lightning callback's state key: a later rule of that key replaces this one
        self.segments: dict[str, list[str]] = {}
        if method != "bp":
            self.points = [PointInfo(n, m) for n, m in resolve_points(model, feedback_points)]
            self.output_name, output_module = resolve_output(model, output)
            if any(p.module is output_module for p in self.points):
                raise ConfigError(f"module {self.output_name!r} is both the output and a feedback point")
            self.point_norms = self._resolve_point_norms()
            self._output_module = output_module
            self.attach_hooks()

    @property
    def capture(self) -> dict[str, torch.Tensor] | None:
        return self._capture

    @capture.setter
    def capture(self, value: dict[str, torch.Tensor] | None) -> None:
        """Starting or ending a capture also starts or drops its list of every call (a point called twice per
        forward: a module at several layers, a shared block), so no graph outlives its capture."""
        self._capture = value
        self.capture_calls: dict[str, list[torch.Tensor]] = {}
        self._raw_output: torch.Tensor | None = None  # the output before the injection: only the layers above

    def _resolve_point_norms(self) -> dict[str, str]:
        """Each point's ``feedback_norm`` mode; a glob of the mapping that matches no point is a typo: named."""
        names = [p.name for p in self.points]
        if isinstance(self.feedback_norm, str):
            return dict.fromkeys(names, self.feedback_norm)
        for pattern in self.feedback_norm:
            if not any(glob_match(n, pattern) for n in names):
                raise ConfigError(f"feedback_norm: pattern {pattern!r} matches no feedback point; points: "
                                  f"{', '.join(names)}")
        return {n: next((m for g, m in self.feedback_norm.items() if glob_match(n, g)), "none") for n in names}

    # ------------------------------------------------------------------ hooks
    def _point_hook(self, index: int):
        info = self.points[index]

        def hook(module: nn.Module, args, out):
            if not isinstance(out, torch.Tensor):
                raise ConfigError(
                    f"feedback point {info.name!r} ({type(module).__name__}) returns {type(out).__name__}, "
                    "not a Tensor; choose a submodule whose output is a single tensor"
                )
            if info.width is None:
                self._record_width(index, out)
            if self.capture is not None:  # a probe: every call's width checked, every call kept for the report
                self._check_width(index, out)
                self.capture[info.name] = out
                self.capture_calls.setdefault(info.name, []).append(out)
                if self._calibrating and not torch.is_grad_enabled():
                    self._no_grad_points.add(info.name)
            if not self.enabled or not torch.is_grad_enabled() or not out.requires_grad:
                return None
            if self.method == "dfa":
                pending = self._pending
                if not pending.index:  # this forward's first point: per point needs B and the error's width
                    pending.kind = self._receiver_kind(out.device)
                pending.index.append(index)
                if len(self.batch_dims) > 1:  # checked against the output's when it runs (a flat token hides them)
                    pending.batches.append(tuple(out.shape[d] for d in self.batch_dims))
                mode = self.point_norms[info.name]
                receives = out if mode == "none" else self.normalise(out, mode)
                if pending.kind == "matmul":
                    pending.tensors.append(self._receive(index, receives))
                elif pending.kind == "token":  # (a list, not a generator: torch.compile traces it without a break)
                    rows = (out.shape[0] if self.batch_dims == (0,)
                            else math.prod([out.shape[d] for d in self.batch_dims]))
                    pending.tensors.append(_ReceiveFeedback.apply(self, index, rows, self._token_width,
                                                                  self._token_dtype, receives))
                else:
                    pending.tensors.append(receives)
                if mode != "none":  # the norm's backward keeps `out`: an in-place op above (ReLU(inplace=True))
                    # must not bump its version through a detached alias
                    return self._cut(info.name, out.detach().clone())
            return self._cut(info.name, out.detach())

        return hook

    def _cut(self, name: str, cut: torch.Tensor) -> torch.Tensor:
        """The tensor a point hands the layers above; calibrate's forward keeps each alive (so that no other tensor
        can share its ``id`` meanwhile), to see which ones the layers above take."""
        if self._cuts is not None and self.method == "dfa":
            self._cuts[id(cut)] = (name, cut)
        return cut

    def _output_hook(self, module: nn.Module, args, out):
        if not isinstance(out, torch.Tensor):
            raise ConfigError(
                f"output module {self.output_name or type(module).__name__!r} returns {type(out).__name__}, "
                "not a Tensor; set `output:` to a submodule whose output is the tensor the error is taken at"
            )
        if self.d_out is None or self._rows is None:  # first forward, or calibrate()'s: not on every step
            self._rows, self.d_out = flatten_batch(out.detach(), self.batch_dims).shape
            self._batch_shape = tuple(out.shape[d] for d in self.batch_dims)
            self._projection_itemsize = self.compute_dtype(out.dtype).itemsize
            # nothing trainable between the points and the model's output: under DFA the last point's layer gets
            # B e, not e; under shallow nothing trains at all
            self._bare_top = (self._pending.index[-1] if self._pending.index else -1) \
                if self.points and not out.requires_grad and not self.output_name else None
        if out.dtype != self._output_dtype:  # per point: the next tokens carry the error in its projection dtype
            self._output_dtype, self._token_dtype = out.dtype, self.compute_dtype(out.dtype)
        if self.capture is not None:
            self.capture["__output__"] = self._raw_output = out
        if not self._pending.tensors:
            return None
        index, tensors, kind = tuple(self._pending.index), tuple(self._pending.tensors), self._pending.kind
        if self._pending.batches:
            batch = tuple(out.shape[d] for d in self.batch_dims)
            for i, point in zip(index, self._pending.batches):
                self._check_batch_order(i, point, batch)
        self._pending.clear()
        if not self.enabled or not torch.is_grad_enabled():
            return None
        if self.operator is None:  # drawn once; never `ensure_matrix()` here: `.matrix` densifies lowrank/sparse B
            if self._calibrating and not self.ready:  # an eval-mode probe missed a point that runs in training
                return None  # only: B waits for the first training forward, which sizes it
            self.ensure_matrix()
        if self._warm != (out.device, self._token_dtype):  # B's device copy, made here: the backward only reads
            self.warm(out.device)
        injected = _InjectFeedback.apply(self, index, kind, out, *tensors)
        if self.capture is not None:  # the error is read at the injected output: the raw one holds no graph when
            self.capture["__output__"] = injected  # nothing trainable lies between the last point and the output
        return injected

    def normalise(self, out: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """``mode="layer"``: the point's output normalised over its feature dims (those not in ``batch_dims``)
        per sample, no affine parameters; ``"orthogonal"``: the same times its per-sample scale, held constant.
        Only the backward matters: ``B_i e`` is handed to this tensor, and autograd's LayerNorm backward carries
        it to the point's output (times the scale: without the ``1/scale``). ``mode`` None: the engine's
        ``feedback_norm`` (a string)."""
        mode = self.feedback_norm if mode is None else mode
        if not isinstance(mode, str):
            raise ValueError("normalise: feedback_norm is set per point here; pass the point's mode "
                             "(engine.point_norms[name])")
        if mode not in ("layer", "orthogonal"):
            raise ValueError(f"normalise: mode must be 'layer' or 'orthogonal', got {mode!r}")
        feature_dims = [d for d in range(out.dim()) if d not in self.batch_dims]
        if self.batch_dims == tuple(range(len(self.batch_dims))):  # features trailing: the fused kernel
            normed = F.layer_norm(out, out.shape[len(self.batch_dims):])
            if mode == "layer":
                return normed
            var = out.detach().var(dim=feature_dims, keepdim=True, unbiased=False)
            return normed * torch.sqrt(var + 1e-5)
        mean = out.mean(dim=feature_dims, keepdim=True)
        var = out.var(dim=feature_dims, keepdim=True, unbiased=False)
        if mode == "layer":
            return (out - mean) * torch.rsqrt(var + 1e-5)
        return (out - mean) * torch.rsqrt(var + 1e-5) * torch.sqrt(var.detach() + 1e-5)

    def _receiver_kind(self, device: torch.device) -> str:
        """How this forward's points feed the output: ``fused`` (their outputs), or per point ``token`` or
        ``matmul`` (see ``receiver``); per point needs B drawn (the prepared error's width)."""
        if self.mode != "per_point" or self._token_width is None:
            return "fused"
        if (self.receiver != "matmul" or torch.compiler.is_compiling()
                or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
            return "token"  # compiled, or captured in a CUDA graph: no Python per step left to save
        if self._warm != (device, self._token_dtype) or not self._receivers:  # read in this forward: made now
            self.warm(device)
        return "matmul"

    def _receive(self, index: int, out: torch.Tensor) -> torch.Tensor:
        """Matmul receiver: ``z_i = h_i M_i^T`` ``[N, w]``; the output hands it the prepared error ``P``, and
        autograd's matmul backward returns ``P M_i = B_i e`` to the point, cast and shaped back by the backward of
        the cast and reshape here. Its value is never used. Autocast is off around it: it runs in the projection's
        dtype like the token's projection."""
        flat = flatten_batch(out, self.batch_dims)
        if flat.shape[1] != self.points[index].width:
            self._width_changed(index, flat.shape[1])
        if flat.dtype != self._token_dtype:
            flat = flat.to(self._token_dtype)
        device = out.device.type
        if not torch.is_autocast_enabled(device):
            return flat @ self._receivers[index]
        torch.set_autocast_enabled(device, False)  # (not `with torch.autocast(...)`: 3 µs of Python per point)
        try:
            return flat @ self._receivers[index]
        finally:
            torch.set_autocast_enabled(device, True)

    def _record_width(self, index: int, out: torch.Tensor) -> None:
        if out.dim() <= max(self.batch_dims, default=-1):
            raise ConfigError(
                f"feedback point {self.points[index].name!r} output has shape {tuple(out.shape)}, "
                f"fewer dims than batch_dims {list(self.batch_dims)}"
            )
        point = self.points[index]
        point.width = flatten_batch(out.detach(), self.batch_dims).shape[1]
        mode = self.point_norms.get(point.name, "none")
        if mode != "none" and (point.width < 2 or out.dim() == len(self.batch_dims)):
            raise ConfigError(
                f"feedback_norm {mode!r} at feedback point {point.name!r}: its output {tuple(out.shape)} has "
                f"{'no feature dim' if out.dim() == len(self.batch_dims) else 'one feature'} beyond batch_dims "
                f"{list(self.batch_dims)}, and a norm over fewer than two features passes no feedback; give this "
                "point feedback_norm none (a mapping sets it per point)")

    def _check_width(self, index: int, out: torch.Tensor) -> None:
        """A probe's check that a point keeps the width it was first seen with (one module at several layers)."""
        if out.dim() > max(self.batch_dims, default=-1):
            width = flatten_batch(out.detach(), self.batch_dims).shape[1]
            if width != self.points[index].width:
                self._width_changed(index, width)

    def _width_changed(self, index: int, width: int) -> None:
        point = self.points[index]
        raise ConfigError(
            f"feedback point {point.name!r} ({type(point.module).__name__}) output is {width} wide over batch_dims "
            f"{list(self.batch_dims)}, and was {point.width} wide when its B was sized: a point keeps one width. "
            "One module used at layers of different widths (a shared activation) needs a module per layer; a "
            "length that varies between batches (tokens) belongs in batch_dims, e.g. [0, 1]")

    # ------------------------------------------------------------------ fused or per point
    @property
    def mode(self) -> str:
        """The projection in effect: ``fused`` or ``per_point`` (``auto`` is fused until :meth:`calibrate` decides)."""
        if self.projection == "auto":
            return self.calibration["choice"] if self.calibration else "fused"
        return self.projection

    @property
    def receiver(self) -> str:
        """Per point, how ``B_i e`` reaches point i in an eager step: ``token`` or ``matmul`` (``auto`` is token
        until :meth:`calibrate` decides)."""
        if self.receiver_choice != "auto":
            return self.receiver_choice
        return self.calibration.get("receiver", "token") if self.calibration else "token"

    def calibrate(self, forward: Callable[[], object], optimizer_state_bytes: int = 0) -> dict[str, float | int | str]:
        """Run ``forward`` (one training forward with grad, e.g. on a probe batch) and measure what the fused
        projection would cost in memory against what the step holds anyway; with ``projection="auto"``, choose.

        Fused keeps every ``B_i e`` alive from the start of the backward (``N x K`` fp32 on top of the saved
        activations, the BP peak); per point keeps one at a time. Measured: the distinct storages autograd saves
        for backward (activations; parameters counted separately) and the parameters (x2 with their gradients);
        the optimizer's state is added when known (see :meth:`count_optimizer_state`). The same forward's matmul
        FLOPs (``FlopCounterMode``) decide ``receiver="auto"``: matmul receivers when their thin forward matmuls
        cost at most 2 % of a BP step. They add no memory to count: each ``N x w`` output is freed in the forward
        once the output's Function has taken it, and autograd saves only ``M_i`` (the point's block of B).
        """
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse / exotic layouts: count the tensor itself
                key, size = id(t), t.numel() * t.element_size()
            if key not in params:
                saved[key] = size
            # detached: a saved output returned as itself holds its own grad_fn, a cycle through C++ that no
            # collector sees, so the probe's whole graph (activations, and the parameters' gradient accumulators
            # bound to the stream it ran on: a CUDA graph captured later fails) would outlive the probe
            return t.detach()

        self._rows, self._calibrating, self._no_grad_points, self._cuts = None, True, set(), {}
        taken = _InputsTaken(self._cuts)
        try:
            with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad(),
                  FlopCounterMode(display=False) as flops, taken):
                forward()
            self._warn_points_unused(taken.names)
        finally:
            self._calibrating, self._cuts = False, None
        self._warn_points_without_grad()
        self._check_points_precede_output()
        self._check_point_rows()
        self._check_something_trains_above_the_points()
        param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        rows = self._rows or 0
        columns = sum(p.width or 0 for p in self.points)
        fused_bytes = rows * columns * self._projection_itemsize
        self.calibration = dict(saved_activation_bytes=sum(saved.values()), parameter_bytes=param_bytes,
                                fused_signal_bytes=fused_bytes, forward_matmul_flops=flops.get_total_flops(),
                                receiver_flops=self._receiver_flops(rows))
        c = self.calibration
        cheap = max(RECEIVER_FLOP_BUDGET * 3 * c["forward_matmul_flops"], RECEIVER_FREE_FLOPS * len(self.points))
        c["receiver"] = "matmul" if self.operator_kind != "sparse" and c["receiver_flops"] <= cheap else "token"
        return self.count_optimizer_state(optimizer_state_bytes)

    def _warn_points_unused(self, taken: set[str]) -> None:
        """A point whose output nothing above takes (an auxiliary branch left out of the loss, a module the forward
        computes and drops): backprop would give the layers below it no gradient, DFA's ``B e`` still trains them."""
        unused = sorted({name for name, _ in (self._cuts or {}).values()} - taken)
        if unused:
            warnings.warn(f"feedback point(s) {', '.join(unused)}: nothing in the forward takes the output, yet under "
                          "DFA the layers below still train on B e (backprop would leave them alone); take the "
                          "point out of feedback_points unless that is meant", stacklevel=4)

    def _warn_points_without_grad(self) -> None:
        """Points that ran with grad off inside the probe's training forward get no feedback there; under
        ``torch.utils.checkpoint(use_reentrant=True)``, which runs its function so and reruns it in the backward,
        the backward then fails with torch's "none of output has requires_grad=True"."""
        if self._no_grad_points and self.method == "dfa":
            warnings.warn(f"feedback point(s) {', '.join(sorted(self._no_grad_points))} ran with grad disabled in a "
                          "training forward, so no feedback reaches them there; inside torch.utils.checkpoint use "
                          "use_reentrant=False (the reentrant variant runs the block without grad and fails in the "
                          "backward)", stacklevel=3)

    def _check_points_precede_output(self) -> None:
        """Points still pending after the forward ran after the output: B e, injected when the output runs, never
        reaches them, so the layers under them would get no update at all (an ``output:`` set to an early module)."""
        late = sorted({self.points[i].name for i in self._pending.index})
        if late:
            self._pending.clear()
            raise ConfigError(f"output {self.output_name!r} runs before the feedback point(s) {', '.join(late)}: the "
                              "error is taken at the output, so no feedback would reach them; set `output:` to the "
                              "module whose output is the network's (or a later one)")

    def _check_point_rows(self) -> None:
        """Every captured point has as many rows over ``batch_dims`` as the output: a ``batch_dims`` that does not
        fit the model (``[1]`` on a graph's ``[nodes, classes]``) is named at the probe, not at the first step."""
        if not self.capture or self._rows is None:
            return
        for i, point in enumerate(self.points):
            out = self.capture.get(point.name)
            if isinstance(out, torch.Tensor) and out.dim() > max(self.batch_dims):
                n_point = math.prod(out.shape[d] for d in self.batch_dims)
                if n_point != self._rows:
                    self._rows_mismatch(i, n_point, self._rows)
                self._check_batch_order(i, tuple(out.shape[d] for d in self.batch_dims), self._batch_shape)

    def _check_something_trains_above_the_points(self) -> None:
        """A point with nothing trainable above it (``torch.nn.Linear`` matching an MLP's last layer too): its layer
        gets ``B e``, a random mix of the error, where DFA gives the top layer the error itself. It still trains,
        worse, so a warning rather than a refusal; under ``shallow`` nothing would train at all: refused. Only where
        the error is the model's own output: an ``output:`` set inside the model is where the user chose to take it
        (the LM's error before the vocabulary, whose last block gets ``B e`` as in the paper's code)."""
        index, self._bare_top = self._bare_top, None
        if index is None or not torch.is_grad_enabled():
            return
        if self.method == "shallow":
            raise ConfigError(f"method shallow: the model's output depends on no trainable parameter outside the "
                              f"feedback points ({', '.join(p.name for p in self.points)}), so nothing would train; "
                              "leave the last layer out of feedback_points")
        if index < 0:
            return
        point = self.points[index]
        warnings.warn(f"feedback point {point.name!r} ({type(point.module).__name__}) has nothing trainable between "
                      f"it and the model's output: its layer gets a random projection B e of the error instead of the "
                      "error itself, as DFA trains the top layer; leave it out of feedback_points (name the hidden "
                      "layers, e.g. 'hidden.*', rather than a type that matches the last layer too)", stacklevel=2)

    def _receiver_flops(self, rows: int) -> int:
        """FLOPs that matmul receivers add to a step: their forward matmuls, and with shared columns the per-point
        products that the token path computes once for the widest point and slices."""
        widths = [p.width or 0 for p in self.points]
        if not widths:
            return 0
        w = self.rank if self.operator_kind == "lowrank" else (self.d_out or 0)
        extra = 2 * rows * w * sum(widths)
        if self.shared_slices:
            extra += 2 * rows * w * (sum(widths) - max(widths))
        return extra

    def count_optimizer_state(self, state_bytes: int) -> dict[str, float | int | str]:
        """(Re)make the ``auto`` choice with the optimizer's state counted in the step's memory.

        The probe forward runs before the optimizer exists (Lightning's ``setup``), so the callback calls this
        again at ``on_fit_start`` with :func:`optimizer_state_bytes`. Switching between steps is safe: fused and
        per point give the same gradients.
        """
        if self.calibration is None:
            raise RuntimeError("count_optimizer_state() needs calibrate() first")
        c = self.calibration
        step_bytes = c["saved_activation_bytes"] + 2 * c["parameter_bytes"] + int(state_bytes)
        c["optimizer_state_bytes"], c["step_bytes"] = int(state_bytes), step_bytes
        c["fused_fraction"] = c["fused_signal_bytes"] / max(step_bytes, 1)
        c["choice"] = "fused" if c["fused_fraction"] <= AUTO_FUSED_BUDGET else "per_point"
        return c

    # ------------------------------------------------------------------ matrices
    @property
    def ready(self) -> bool:
        return self.method == "bp" or (self.d_out is not None and all(p.width is not None for p in self.points))

    @property
    def matrix(self) -> torch.Tensor | None:
        """The effective feedback matrix ``[d_out, K]`` (the stored one for ``dense``)."""
        return None if self.operator is None else self.operator.dense()

    def ensure_matrix(self) -> torch.Tensor | None:
        """Draw the operator once all widths are known (at setup from a probe batch, or at the first forward)."""
        if self.method != "dfa" or self.operator is not None:
            return self.matrix
        if not self.ready:
            missing = [p.name for p in self.points if p.width is None]
            raise ConfigError(f"feedback point(s) never ran before the output in a training forward: "
                              f"{', '.join(missing)} (a module the forward does not call, or one it calls only "
                              "after the output module)")
        if self._deferred_state is not None:  # a checkpoint's B, loaded before the widths were known
            self.load_feedback_state(*self._deferred_state)
            return self.matrix
        lay = self._make_layout()
        if self.operator_kind == "lowrank" and self.rank >= min(self.d_out, lay.total):
            warnings.warn(f"lowrank operator of rank {self.rank} for a {self.d_out} x {lay.total} B: no lower than "
                          f"the dense one (rank at most {min(self.d_out, lay.total)}), and it costs more; use "
                          "operator: dense, or a rank below that", stacklevel=2)
        if self.operator_kind == "sparse" and self.nnz >= self.d_out:
            warnings.warn(f"sparse operator with nnz {self.nnz} for a {self.d_out}-wide error: every column listens "
                          f"to all {self.d_out} outputs (nnz is cut to {self.d_out}), a dense B stored sparse; use "
                          f"operator: dense, or an nnz below {self.d_out}", stacklevel=2)
        operator = operators.draw_operator(self.operator_kind, self.d_out, lay, self.init, self.seed,
                                           self.shared_slices, self.rank, self.nnz)
        if self.shared_slices and self._post_scales is None:  # one factor for the shared columns: fold it in
            operator = operator.scaled(lay.scales[0])
        self._install(operator)
        return self.matrix

    def warm(self, device: torch.device) -> None:
        """Copy B to ``device`` in the projection's dtype, ahead of the steps (the Lightning callback calls it once
        the model is on its device): a compiled step then finds B there and is not recompiled after its first run."""
        if self.operator is not None:
            self._warm = (torch.device(device), self._token_dtype)
            self.operator.warm(*self._warm, self._layout.slices)
            self._receivers = self._make_receivers(*self._warm) if self.receiver == "matmul" else []

    def _make_receivers(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """``M_i^T`` ``[d_i, w]`` per point: views of the operator's device copy (copies where shared columns
        carry a factor per point)."""
        blocks = [self.operator.block(device, dtype, start, stop) for start, stop in self._layout.slices]
        if self._post_scales is not None:
            blocks = [b * scale for b, scale in zip(blocks, self._post_scales)]
        return [b.t() for b in blocks]

    def _install(self, operator: operators.FeedbackOperator) -> None:
        self.operator = operator
        self._warm = None  # (device, dtype) of the operator's device copy (see _output_hook)
        # per point, the injector hands every token the prepared error: e (dense, sparse), e U (lowrank), or with
        # shared columns the one product e B that every point slices
        self._token_width = self._layout.total if self.shared_slices else operator.prepared_width

    def _make_layout(self) -> matrices.FeedbackLayout:
        self._layout = matrices.layout([p.width for p in self.points], self.scale, self.shared_slices)
        scales = self._layout.scales
        # shared columns with different factors per point: applied after slicing; otherwise folded into B
        self._post_scales = scales if self.shared_slices and len(set(scales)) > 1 else None
        return self._layout

    def set_matrix(self, matrix: torch.Tensor) -> None:
        """Install a dense ``B`` as used in the projection (tests, experiments)."""
        self.load_feedback_state({"matrix": matrix}, "dense")

    def feedback_state(self) -> dict[str, torch.Tensor] | None:
        if self.operator is None:  # not drawn yet: a checkpoint's B still waiting for the widths, or nothing
            return None if self._deferred_state is None else dict(self._deferred_state[0])
        return dict(self.operator.tensors)

    def load_feedback_state(self, state: dict[str, torch.Tensor], kind: str | None = None) -> None:
        """Install a checkpointed operator; its shape must fit this model's widths. Before the widths are known (no
        probe batch), it is kept and installed at the first forward in place of a fresh draw."""
        if not self.ready or self.d_out is None:
            self._deferred_state = (state, kind)
            return
        self._deferred_state = None
        lay = self._make_layout()
        op = operators.from_state({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                  kind or self.operator_kind)
        if tuple(op.dense().shape) != (self.d_out, lay.total):
            raise ConfigError(
                f"feedback matrix shape {tuple(op.dense().shape)} does not fit this model "
                f"(expected {(self.d_out, lay.total)}: d_out x feedback columns)"
            )
        self._install(op)

    # ------------------------------------------------------------------ the projection
    def project(self, grad_output, index, shapes, dtypes) -> list[torch.Tensor]:
        """All ``B_i e`` from one projection (in :meth:`compute_dtype`), shaped and cast like each point."""
        projected = self.operator.project(self._error(grad_output))  # [N, K], the single projection of the step
        if self._post_scales is None and len(set(dtypes)) == 1 and projected.dtype != dtypes[0]:
            projected = projected.to(dtypes[0])  # bf16 points of an fp32 projection: one cast, not one per point
        lay = self._layout
        if self.shared_slices:  # every point reads the first d_i columns (all of them when it is the widest)
            columns = [projected if lay.widths[i] == lay.total else projected[:, :lay.widths[i]] for i in index]
        else:  # consecutive blocks: one split, not one slicing call per point (host time: small GPU steps are
            blocks = projected.split(lay.widths, dim=1)  # launch-bound, see README "On one H200")
            columns = [blocks[i] for i in index]
        return [self._signal(i, g, shape, dt) for i, g, shape, dt in zip(index, columns, shapes, dtypes)]

    def compute_dtype(self, grad_dtype: torch.dtype) -> torch.dtype:
        """The projection's dtype: fp32 (fp64 stays fp64) by default; ``projection_dtype="gradient"``: the error's own
        dtype, i.e. bf16/fp16 under AMP, where tensor cores run the matmul with fp32 accumulation at several times
        the fp32 rate (worth it when e is wide: the error after a large vocabulary)."""
        if self.projection_dtype == "gradient":
            return grad_dtype
        return torch.promote_types(grad_dtype, torch.float32)

    def prepare_error(self, grad_output: torch.Tensor, shared_product: bool = True) -> torch.Tensor:
        """``projection="per_point"``: what every point's projection starts from, computed once per step in
        :meth:`compute_dtype`: the flattened, transformed error prepared by the operator (``e U`` for lowrank), or
        with ``shared_slices`` (tokens) the one product ``e B`` that every point slices (one signal's memory, as
        fused); matmul receivers multiply the prepared error by their own block."""
        e = self._error(grad_output)
        return self.operator.project(e) if self.shared_slices and shared_product else self.operator.prepare(e)

    def check_tokens(self, prepared: torch.Tensor, index: Sequence[int], shapes: Sequence[torch.Size]) -> None:
        """Every point must have as many batch elements as the output (else autograd's shape error, unnamed)."""
        rows = prepared.shape[0]
        for i, shape in zip(index, shapes):  # a token is [rows, width]: its rows are the point's batch elements
            if shape[0] != rows:
                self._rows_mismatch(i, shape[0], rows)

    def project_point(self, prepared: torch.Tensor, i: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """``projection="per_point"``: ``B_i e`` for point ``i`` alone, shaped and cast like the point."""
        start, stop = self._layout.slices[i]
        if self.shared_slices:  # the shared product was computed once by prepare_error: slice it
            g = prepared if stop - start == prepared.shape[1] else prepared[:, start:stop]
        else:
            g = self.operator.project_slice(prepared, start, stop)
        return self._signal(i, g, shape, dtype)

    def _error(self, grad_output: torch.Tensor) -> torch.Tensor:
        """``e`` as the operator takes it: ``[N, d_out]`` in :meth:`compute_dtype`, transformed (sign, ternary)."""
        dtype = self.compute_dtype(grad_output.dtype)
        e = flatten_batch(grad_output, self.batch_dims)
        if e.shape[1] != self.d_out:
            raise ConfigError(
                f"the output ({self.output_name or 'the model'}) is {e.shape[1]} wide over batch_dims "
                f"{list(self.batch_dims)} in this step, and was {self.d_out} wide when B was sized: the error keeps "
                "one width (a length that varies between batches, e.g. tokens, belongs in batch_dims: [0, 1])")
        return operators.transform_error(e if e.dtype == dtype else e.to(dtype), self.error)

    def _signal(self, i: int, g: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Point ``i``'s columns ``g`` ([N, d_i]) as its gradient: its own scale (shared columns), shape and dtype."""
        if self._post_scales is not None:
            g = g * self._post_scales[i]
        self._check_rows(i, shape, g.shape[0])
        if g.numel() != shape.numel():  # the rows agree: the point's width changed since B was sized
            self._width_changed(i, shape.numel() // max(g.shape[0], 1))
        g = unflatten_batch(g, shape, self.batch_dims)
        return g if g.dtype == dtype else g.to(dtype)

    def _check_rows(self, i: int, shape: torch.Size, rows: int) -> None:
        if self.batch_dims == (0,) and shape[0] == rows:  # the common case, without a generator per point and step
            return
        n_point = math.prod([shape[d] for d in self.batch_dims])
        if n_point != rows:
            self._rows_mismatch(i, n_point, rows)

    def _rows_mismatch(self, i: int, n_point: int, rows: int) -> None:
        raise ConfigError(f"feedback point {self.points[i].name!r} has {n_point} batch elements over batch_dims "
                          f"{list(self.batch_dims)} but the output has {rows}; adjust batch_dims")

    def _check_batch_order(self, i: int, point: tuple[int, ...], output: tuple[int, ...] | None) -> None:
        """As many rows as the output, laid out otherwise (a sequence-first block, ``[T, B, H]``, in a batch-first
        model whose output is ``[B, T, V]``): row (t, b) of the point would get the B e of the output's row (b, t),
        another token's error, with no shape error to say so."""
        if output is None or point == output:
            return
        if math.prod(point) != math.prod(output):
            self._rows_mismatch(i, math.prod(point), math.prod(output))
        raise ConfigError(f"feedback point {self.points[i].name!r} is {list(point)} over batch_dims "
                          f"{list(self.batch_dims)} and the output {list(output)}: the same rows in another layout, "
                          "so each would get another row's feedback; choose a point whose batch dims are laid out "
                          "as the output's (e.g. after the block transposes back)")

    def reset(self) -> None:
        """Forget points recorded by a forward that never reached the output (call at each batch start)."""
        self._pending.clear()

    def attach_hooks(self) -> None:
        """The forward hooks that cut the graph at the points and inject B e at the output (again after a detach)."""
        if self._handles or self.method == "bp":
            return
        for i, p in enumerate(self.points):
            self._handles.append(p.module.register_forward_hook(self._point_hook(i)))
        self._handles.append(self._output_module.register_forward_hook(self._output_hook))

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ report
    def report(self) -> str:
        """Which modules are feedback points, their widths, and which parameters train how."""
        if self.method == "bp":
            return "FeedbackAlignmentStrategy: method=bp (backprop, nothing attached)"
        params = dict(self.model.named_parameters())
        count = lambda names: sum(params[n].numel() for n in names)  # noqa: E731
        head = (f"FeedbackAlignmentStrategy: method={self.method}, output={self.output_name or '<model>'} "
                f"(d_out={self.d_out}), batch_dims={list(self.batch_dims)}")
        if self.method == "shallow":  # no B and no projection: their settings would read as if they were used
            lines = [head + " (no feedback: the points cut the gradient)"]
        else:
            lines = [
                f"{head}, init={self.init}, scale={self.scale}, shared_slices={self.shared_slices}, seed={self.seed}, "
                f"operator={self.operator_kind}, error={self.error}, projection={self._projection_text()}"
                + ("" if self.projection_dtype == "float32" else f", projection_dtype={self.projection_dtype}")
                + ("" if self.feedback_norm == "none" else f", feedback_norm={self.feedback_norm}"),
            ]
        for p in self.points:
            seg = self.segments.get(p.name, [])
            calls = self.calls.get(p.name, 1)
            lines.append(f"  point {p.name:<28} {type(p.module).__name__:<14} width={p.width!s:<6} "
                         f"segment params={count(seg):,}"
                         + (f" (called {calls}x per forward: every call gets this point's B_i e)" if calls > 1
                            else "")
                         + (" (not seen by the eval-mode probe: sized at the first training forward)"
                            if p.width is None and self.calibration is not None else ""))
        tied = self.tied
        below = {n for p in self.points for n in self.segments.get(p.name, [])} - set(tied)
        above = [n for n in self.segments.get("__output__", []) if n not in below and n not in tied]
        unused = [n for n in params if n not in below and n not in above and n not in tied]
        how = "direct feedback B_i e" if self.method == "dfa" else "nothing: frozen (shallow control)"
        lines.append(f"  below the points, trained by {how}: {count(below):,} params in {len(below)} tensors")
        lines.append(f"  above the last point, backprop from the output: {count(above):,} params "
                     f"({', '.join(above) or '-'})")
        if tied:  # one tensor on both sides of the cut (tied embeddings): the layers above train it by backprop
            also = " and by B_i e below" if self.method == "dfa" else " (not frozen, under shallow too)"
            lines.append(f"  tied across the points, trained by backprop from the output{also}: {count(tied):,} "
                         f"params ({', '.join(tied)})")
        if unused:
            lines.append(f"  outside this rule (not reached from the output's graph: plain backprop where the loss "
                         f"reaches them, e.g. after the output, or another network's rule): {', '.join(unused)}")
        return "\n".join(lines)

    def _projection_text(self) -> str:
        if self.projection == "per_point":
            return f"per_point, receiver={self._receiver_text()}"
        if self.projection != "auto":
            return self.projection
        c = self.calibration
        if c is None:
            return "auto -> fused (not calibrated)"
        text = (f"auto -> {self.mode} (fused signals {_size(c['fused_signal_bytes'])} = "
                f"{100 * c['fused_fraction']:.0f}% of the step's {_size(c['step_bytes'])}: saved activations "
                f"{_size(c['saved_activation_bytes'])}, params + grads {_size(2 * c['parameter_bytes'])}, optimizer "
                f"state {_size(c['optimizer_state_bytes'])}; fused up to {100 * AUTO_FUSED_BUDGET:.0f}%)")
        return text + (f", receiver={self._receiver_text()}" if self.mode == "per_point" else "")

    def _receiver_text(self) -> str:
        c = self.calibration
        if self.receiver_choice != "auto" or not c:
            return self.receiver
        step = 3 * c["forward_matmul_flops"]
        share = f"{100 * c['receiver_flops'] / step:.1f}%" if step else "n/a"
        return (f"auto -> {self.receiver} (matmul receivers: {c['receiver_flops'] / 1e6:.1f} MFLOP = {share} of a "
                f"BP step's matmul FLOPs; matmul up to {100 * RECEIVER_FLOP_BUDGET:.0f}% or "
                f"{RECEIVER_FREE_FLOPS / 1e6:.0f} MFLOP per point)")

    def record_segments(self) -> None:
        """From a captured DFA forward, list the parameters each point's segment (and the output's) reaches.

        The cut makes every segment's graph end at the detached output of the point below, so a walk of the
        autograd graph from a point's raw output finds exactly the parameters that its feedback trains.
        """
        ids = {id(p): n for n, p in self.model.named_parameters()}
        self.segments = {name: _reachable_parameters(t, ids) for name, t in (self.capture or {}).items()}
        for name, outs in self.capture_calls.items():  # a point called several times: every call's segment
            self.calls[name] = len(outs)
            if len(outs) > 1:
                self.segments[name] = sorted({n for t in outs for n in _reachable_parameters(t, ids)})
        if self._raw_output is not None:  # above the points (the injected output's graph reaches below them too)
            below = {n for p in self.points for n in self.segments.get(p.name, [])}
            self.tied = sorted(below & set(_reachable_parameters(self._raw_output, ids)))


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def optimizer_state_bytes(optimizers: Sequence[torch.optim.Optimizer]) -> int:
    """Bytes of optimizer state a training step holds: what exists, else the usual count for the optimizer's class.

    Torch optimizers create their state at the first ``step()``; before it, e.g. Adam is counted as two tensors
    per trainable parameter (three with ``amsgrad``), SGD as one with momentum, none without. Unknown optimizers
    count as none (the conservative side: the fused projection then looks relatively dearer).
    """
    total = 0
    for opt in optimizers:
        for group in opt.param_groups:
            n = OPTIMIZER_STATES.get(type(opt).__name__, 0)
            if group.get("amsgrad"):
                n += 1
            if type(opt).__name__ in ("SGD", "RMSprop") and group.get("momentum", 0):
                n += 1
            if group.get("centered"):
                n += 1
            for p in group["params"]:
                state = opt.state.get(p)
                if state:
                    total += sum(v.numel() * v.element_size() for v in state.values()
                                 if isinstance(v, torch.Tensor) and v.dim() > 0)
                elif p.requires_grad:
                    total += n * p.numel() * p.element_size()
    return total


class _InputsTaken(TorchFunctionMode):
    """The points whose handed-on tensor (``cuts``: id -> (point, tensor), each kept alive, so an id seen at a call
    is that tensor's) a torch function or method called under it takes (calibrate's forward). Reading an attribute
    (``.shape``) does not count as taking it."""

    def __init__(self, cuts: dict[int, tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        self.cuts, self.names = cuts, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__":
            for a in tree_leaves((args, kwargs)):
                if isinstance(a, torch.Tensor) and id(a) in self.cuts:
                    self.names.add(self.cuts[id(a)][0])
        return func(*args, **kwargs)


def _reachable_parameters(tensor: torch.Tensor, ids: dict[int, str]) -> list[str]:
    found, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in ids:
            found.append(ids[id(var)])
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return sorted(set(found))
