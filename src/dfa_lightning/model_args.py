"""Range checks of a recipe's model arguments (the network, its optimizer and scheduler), read off their
signatures, before anything is built.

Why: a size of 0 or a dropout of 1.5 passed the type check and ended as a traceback deep in PyTorch (a lazy
parameter never initialised, a ZeroDivisionError in the attention heads, an IndexError on an empty ``mlp_dims``).
For this package's own models an ``int`` argument is a size or count, so it must be at least 1 (a few counts may be
0); a ``dropout`` is a probability, for any model. The optimizer's ``lr`` must be a number, and one that trains.
"""
from __future__ import annotations

import importlib
import inspect
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["model_arg_problem", "null_arg_problem", "learning_rate_problem", "MAY_BE_ZERO"]

#: ``int`` arguments of the package's models that may be 0: no frequencies, no extra layers of one kind.
MAY_BE_ZERO = frozenset({"num_freqs", "num_freqs_dir", "num_freqs_xyz", "num_cross_layers", "num_attn_layers"})
OWN_MODELS = "dfa_lightning.models."
#: scheduler arguments that give a rate of their own whatever the optimizer's ``lr`` (OneCycleLR's and CyclicLR's
#: bounds, the cosine schedules' ``eta_min``, which they anneal towards); not ``min_lr`` (ReduceLROnPlateau only
#: floors a decrease) nor ``lr_lambda`` (LambdaLR scales the optimizer's rate)
RATE_SETTING = frozenset({"max_lr", "base_lr", "eta_min"})


def _model_class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _is_int_list(annotation: Any) -> bool:
    """``list[int]``, ``Sequence[int]``, or either ``| None``."""
    options = [annotation, *(a for a in typing.get_args(annotation) if a is not type(None))]
    return any(typing.get_origin(a) in (list, Sequence) and typing.get_args(a) == (int,) for a in options)


def model_arg_problem(class_path: str, init_args: Mapping[str, Any]) -> str | None:
    """The first argument out of range, as ``"<key> is <value>: expected ..."``, or None."""
    cls = _model_class(class_path)
    if cls is None:
        return None
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 (an unresolvable annotation: nothing to check against)
        return None
    own = cls.__module__.startswith(OWN_MODELS)
    for key, value in init_args.items():
        if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not 0 <= value <= 1:
                return f"{key} is {value}: expected a probability in [0, 1]"
            continue
        annotation = hints.get(key)
        if not own or annotation is None:
            continue
        low = 0 if key in MAY_BE_ZERO else 1
        if annotation is int:
            if value is None or isinstance(value, bool) or not isinstance(value, int):
                return f"{key} is {value!r}: expected an integer >= {low}"
            if value < low:
                return f"{key} is {value}: expected an integer >= {low}"
        elif _is_int_list(annotation) and isinstance(value, (list, tuple)):
            if key == "mlp_dims" and not value:
                return f"{key} is []: expected at least one layer width"
            bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 1]
            if bad:
                return f"{key} is {list(value)}: expected widths >= 1"
    return None


def null_arg_problem(class_path: str, init_args: Mapping[str, Any]) -> str | None:
    """A ``null`` given to an argument that takes a value (``lr: null`` for Adam, whose default is 1e-3), as
    ``"<key> is null: ..."``: torch's own message was ``'<=' not supported between 'float' and 'NoneType'``."""
    cls = _model_class(class_path)
    try:
        parameters = inspect.signature(cls).parameters if cls is not None else {}
    except (TypeError, ValueError):
        return None
    for key, value in init_args.items():
        param = parameters.get(key)
        if value is None and param is not None and param.default is not None:
            default = "" if param.default is inspect.Parameter.empty else f" (default {param.default})"
            return f"{key} is null: {cls.__name__} takes a value here{default}"
    return None


def learning_rate_problem(lr: Any, scheduler_args: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]]
                          ) -> str | None:
    """``lr: 0`` with nothing that gives any parameter another rate: every weight stays where it started, and the
    run reported the initial weights' test score as a result. A group with its own ``lr`` (some recipes freeze a
    group with lr 0 on purpose, others train one) or a scheduler that gives a rate itself (OneCycleLR's
    ``max_lr``, CyclicLR's ``base_lr``, a cosine schedule's ``eta_min``) keeps the run."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        return None
    if not math.isfinite(lr):  # NaN passed every comparison below, and was then called "lr is 0"
        return f"lr is {lr}: expected a finite rate > 0"
    if lr > 0:
        return None
    if lr < 0:
        return f"lr is {lr}: expected a rate > 0"
    if (any(key in RATE_SETTING and _nonzero(value) for key, value in scheduler_args.items())
            or any(group.get("lr", 0) != 0 for group in param_groups)):
        return None
    return ("lr is 0: no parameter would change, and the run would report the initial weights as trained; to "
            "score those, run `test --ckpt_path init`")


def _nonzero(value: Any) -> bool:
    """A rate, or per-group rates, other than 0 (``max_lr: 0`` gives no rate either)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(not isinstance(v, (int, float)) or v != 0 for v in values)
