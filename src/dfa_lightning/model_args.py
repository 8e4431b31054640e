"""Range checks of a recipe's model arguments, read off the model's signature, before the model is built.

Why: a size of 0 or a dropout of 1.5 passed the type check and ended as a traceback deep in PyTorch (a lazy
parameter never initialised, a ZeroDivisionError in the attention heads, an IndexError on an empty ``mlp_dims``).
For this package's own models an ``int`` argument is a size or count, so it must be at least 1 (a few counts may be
0); a ``dropout`` is a probability, for any model.
"""
from __future__ import annotations

import importlib
import typing
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["model_arg_problem", "MAY_BE_ZERO"]

#: ``int`` arguments of the package's models that may be 0: no frequencies, no extra layers of one kind.
MAY_BE_ZERO = frozenset({"num_freqs", "num_freqs_dir", "num_freqs_xyz", "num_cross_layers", "num_attn_layers"})
OWN_MODELS = "dfa_lightning.models."


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

