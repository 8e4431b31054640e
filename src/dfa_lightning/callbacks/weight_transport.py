"""Where weight transport still happens: which weights' transposes a real training step uses to carry error.

Backprop's biological (and hardware) objection is *weight transport*: the error reaches layer i through ``W^T`` of
every layer above it. DFA replaces that path between feedback points by a fixed ``B_i``, but inside each block the
error still flows by local backprop, so some transposes are still used: attention's projections under macro feedback,
the vocabulary head when the error is taken before it, a norm's scale. The paper's reviewers asked for this to be
said plainly (reviewer 3); this callback measures it instead of arguing it.

How: at the first training step, before its backward, the autograd graph of the loss is walked. A weight is
transported where an operation takes it (directly, or through views, transposes and casts) together with another
input that requires grad, so that the operation's backward multiplies the incoming gradient by the weight to
produce that input's gradient: ``F.linear``/``matmul`` (``W^T``), convolutions, attention projections, attention
vectors, a norm's scale. Additions and concatenations are exempt (their backward never reads the operand's value).
Inputs that carry no gradient (data, a feedback point's detached output, token ids) are not in the graph, so
nothing is recorded for them. Reading the graph is what autograd itself will run, and it sees weights used outside
their module's ``forward`` (``nn.MultiheadAttention``'s ``out_proj``, tied decoders through ``F.linear``). Nothing
is hooked into the model, so the step is unchanged (tested). A compiled model's graph is one opaque node: audit the
eager model.

Counted: parameters with two or more dimensions (weight matrices, kernels, embedding tables, attention vectors) as
"matrix" parameters; a one-dimensional ``weight`` (a norm's elementwise scale) as "elementwise"; biases never (an
input gradient does not read them). A parameter shared by several modules (tied weights) counts once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from dfa_lightning.callbacks.feedback_alignment import FeedbackAlignmentStrategy

__all__ = ["WeightTransportAudit", "ModuleUse", "transported_parameters"]


@dataclass
class ModuleUse:
    """One module with trainable parameters of its own, and what the audited step did with them."""

    name: str  # in ``pl_module.model`` ("" for the model itself)
    type: str
    matrix_params: int  # trainable parameters with >= 2 dims (what W^T would transport)
    elementwise_params: int  # trainable 1-D ``weight`` (a norm's scale)
    other_params: int  # biases and other 1-D parameters: never used by an input gradient
    transported: bool  # a matrix or scale of it carried error: the backward read it for another tensor's gradient
    trained: bool  # at least one of its parameters received a gradient
    segment: str | None  # DFA/shallow: the point whose feedback trains it, "__output__" (no point on its path)


# autograd nodes that only reshape, view, cast or copy their one input: a parameter seen through them is still itself
_STRUCTURAL = {"TBackward", "ViewBackward", "ToCopyBackward", "ExpandBackward", "SliceBackward", "SelectBackward",
               "UnsqueezeBackward", "SqueezeBackward", "PermuteBackward", "TransposeBackward", "ReshapeAliasBackward",
               "UnsafeViewBackward", "AsStridedBackward", "CloneBackward", "AliasBackward", "NarrowBackward",
               "SplitBackward", "SplitWithSizesBackward", "UnbindBackward", "IndexBackward", "ConjBackward"}
# operations whose backward never reads an operand's value: a weight added to an input is not transported
_VALUE_FREE = {"AddBackward", "SubBackward", "CatBackward", "StackBackward"}


def _kind(node) -> str:
    return type(node).__name__.rstrip("0123456789")


def transported_parameters(loss: torch.Tensor, names: dict[int, str]) -> set[str]:
    """Names (from ``names``: ``id(param) -> name``) of the parameters whose values the backward of ``loss`` uses to
    compute the gradient of some other tensor: the weights it transports."""
    param_of: dict[Any, str | None] = {}

    def resolve(node) -> str | None:  # the parameter a node is a view/cast of, else None
        chain = []
        while node is not None and node not in param_of:
            variable = getattr(node, "variable", None)
            if variable is not None:
                param_of[node] = names.get(id(variable))
                break
            inputs = [n for n, _ in node.next_functions if n is not None]
            if _kind(node) not in _STRUCTURAL or len(inputs) != 1:
                param_of[node] = None
                break
            chain.append(node)
            node = inputs[0]
        found = param_of.get(node) if node is not None else None
        for n in chain:
            param_of[n] = found
        return found

    used: set[str] = set()
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        inputs = [n for n, _ in node.next_functions if n is not None]
        stack.extend(inputs)
        if _kind(node) in _VALUE_FREE or resolve(node) is not None:
            continue
        weights = {p for p in map(resolve, inputs) if p is not None}
        if weights and any(resolve(n) is None for n in inputs):  # a weight meets an input that needs its gradient
            used |= weights
    return used


class WeightTransportAudit(pl.Callback):
    """Records, for the first training step, which weights carried error backward (were transported), and what
    trained each module (a feedback point's ``B_i e``, backprop from the output, nothing).

    After that step: ``modules`` (a list of :class:`ModuleUse`, in ``named_modules()`` order), ``points`` (each
    rule's feedback points, in order, with widths), ``rules`` (the methods of the step's FeedbackAlignmentStrategy
    callbacks; empty means plain backprop), and :meth:`summary`. Use it from a recipe (append
    ``dfa_lightning.callbacks.WeightTransportAudit`` to ``trainer.callbacks``) or through
    ``python -m dfa_lightning.transport_map``, which tabulates recipes side by side.

    Args:
        verbose: print the summary after the step (default True).
    """

    def __init__(self, verbose: bool = True) -> None:
        super().__init__()
        self.verbose = verbose
        self.modules: list[ModuleUse] = []
        self.points: list[tuple[str, int | None]] = []
        self.rules: list[str] = []
        self._used: set[int] = set()
        self._params: dict[int, dict[str, Any]] = {}
        self._pending = False
        self._done = False

    # ------------------------------------------------------------------ the audited step
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if self._done:
            return
        for engine in self._engines_without_segments(trainer):  # no probe batch (loaders given to fit): learn the
            engine.capture = {}  # segments from this step's own forward, as the alignment monitor does

    @staticmethod
    def _engines_without_segments(trainer: pl.Trainer) -> list:
        return [cb.engine for cb in trainer.callbacks if isinstance(cb, FeedbackAlignmentStrategy)
                and cb.engine is not None and cb.method != "bp" and not cb.engine.segments]

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._done:
            return
        for engine in self._engines_without_segments(trainer):
            if engine.capture:
                engine.record_segments()
            engine.capture = None
        params = {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}
        used = transported_parameters(loss, {id(p): n for n, p in params.items()})
        self._used = {id(params[n]) for n in used}  # by identity: a tied weight has one name, several owners
        self._pending = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done or not self._pending:
            return
        self._done, self._pending = True, False
        rules = [cb for cb in trainer.callbacks if isinstance(cb, FeedbackAlignmentStrategy)]
        self.rules = [cb.method for cb in rules]
        segment_of: dict[str, str] = {}
        self.points = []
        for cb in rules:
            if cb.engine is None or cb.method == "bp":
                continue
            self.points += [(p.name, p.width) for p in cb.engine.points]
            for segment, names in cb.engine.segments.items():
                for n in names:  # a parameter below a point belongs to that point, not to "__output__"
                    if segment != "__output__" or n not in segment_of:
                        segment_of[n] = segment
        self.modules, self._params = [], {}
        for name, module in pl_module.model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            full = [f"{name}.{n}" if name else n for n, _ in own]
            segments = [segment_of.get(f) for f in full if segment_of.get(f) is not None]
            transported = any(id(p) in self._used and (p.dim() >= 2 or n == "weight") for n, p in own)
            self.modules.append(ModuleUse(
                name=name, type=type(module).__name__,
                matrix_params=sum(p.numel() for _, p in own if p.dim() >= 2),
                elementwise_params=sum(p.numel() for n, p in own if p.dim() == 1 and n == "weight"),
                other_params=sum(p.numel() for n, p in own if p.dim() < 2 and n != "weight"),
                transported=transported,
                trained=any(p.grad is not None for _, p in own),
                segment=segments[0] if segments else None))
            for n, p in own:  # a parameter shared by several modules (tied weights) counts once, transported by any
                kind = "matrix" if p.dim() >= 2 else "elementwise" if n == "weight" else "other"
                entry = self._params.setdefault(id(p), {"numel": p.numel(), "kind": kind, "transported": False,
                                                        "trained": p.grad is not None})
                entry["transported"] |= id(p) in self._used
        if self.verbose:
            rank_zero_info(self.summary())

    # ------------------------------------------------------------------ results
    def totals(self) -> dict[str, int]:
        """Parameter counts (each parameter once, tied weights included): all matrices, those transported, those
        trained; elementwise scales transported; modules holding matrices, and those whose W^T was used."""
        params = self._params.values()
        return {
            "matrix_params": sum(p["numel"] for p in params if p["kind"] == "matrix"),
            "transported_matrix_params": sum(p["numel"] for p in params if p["kind"] == "matrix" and p["transported"]),
            "trained_matrix_params": sum(p["numel"] for p in params if p["kind"] == "matrix" and p["trained"]),
            "transported_elementwise_params": sum(p["numel"] for p in params
                                                  if p["kind"] == "elementwise" and p["transported"]),
            "modules_with_matrices": sum(1 for m in self.modules if m.matrix_params),
            "transported_modules": sum(1 for m in self.modules if m.matrix_params and m.transported),
        }

    def summary(self) -> str:
        t = self.totals()
        share = t["transported_matrix_params"] / max(t["matrix_params"], 1)
        rule = "+".join(self.rules) or "bp"
        names = [m.name for m in self.modules if m.transported and m.matrix_params]
        return (f"WeightTransportAudit ({rule}): W^T used in the backward for {t['transported_matrix_params']:,} of "
                f"{t['matrix_params']:,} matrix parameters ({100 * share:.0f}%), in {t['transported_modules']} of "
                f"{t['modules_with_matrices']} modules: {', '.join(names) or '-'}; elementwise scales used: "
                f"{t['transported_elementwise_params']:,}")

    def as_dict(self) -> dict[str, Any]:
        return {"rules": self.rules, "points": [list(p) for p in self.points], "totals": self.totals(),
                "modules": [asdict(m) for m in self.modules]}
