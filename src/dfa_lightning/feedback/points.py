"""Resolve feedback points from configuration: glob patterns on ``named_modules()`` or module types.

Why configuration: the model must know nothing of DFA, so placement is data in the recipe (``"convs.*"``,
``"blocks.*.ffn.act"`` or ``"torch.nn.ReLU"``), matched here against the module tree.
"""
from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Sequence

from torch import nn

from dfa_lightning.errors import ConfigError


def _as_type(spec: str) -> type | None:
    """``"torch.nn.ReLU"`` -> ``nn.ReLU``; ``None`` when ``spec`` is not a dotted path to a Module class."""
    if "." not in spec or any(ch in spec for ch in "*?["):
        return None
    module_name, _, attr = spec.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern:
    """Glob on dotted names: ``*`` stays inside one name component, ``**`` crosses dots, ``?`` one character."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_match(name: str, pattern: str) -> bool:
    return _glob_regex(pattern).match(name) is not None


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve_points(model: nn.Module, specs: Sequence[str | type]) -> list[tuple[str, nn.Module]]:
    """Modules selected by ``specs``, in ``named_modules()`` order (i.e. roughly bottom to top), each once.

    A spec is a glob on the module's qualified name (``"mlp.*"``; ``*`` does not cross dots, ``**`` does),
    a dotted type path (``"torch.nn.ReLU"``)
    or a type. Every spec must match something: a typo must not silently train fewer layers.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen: dict[str, nn.Module] = {}
    for spec in specs:
        # a module name first: a dotted name ("encoder.layers") is imported as a type path only when no module of
        # the model has it, so naming a point never imports an unrelated package
        hits = [] if isinstance(spec, type) else [(n, m) for n, m in named if glob_match(n, spec)]
        kind = None if hits else spec if isinstance(spec, type) else _as_type(spec)
        if kind is not None:
            hits = [(n, m) for n, m in named if isinstance(m, kind)]
        if not hits:
            names = ", ".join(module_names(model)) or "(no submodules)"
            raise ConfigError(f"feedback point {spec!r} matches no module of {type(model).__name__}; modules: {names}")
        chosen.update(hits)
    order = {n: i for i, (n, _) in enumerate(named)}
    points = sorted(chosen.items(), key=lambda item: order[item[0]])
    _reject_nested(points)
    return points


def _reject_nested(points: list[tuple[str, nn.Module]]) -> None:
    names = [n for n, _ in points]
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ConfigError(f"feedback points {a!r} and {b!r} are nested; choose one of them")


def resolve_output(model: nn.Module, spec: str | None) -> tuple[str, nn.Module]:
    """The module whose output gradient is the error e (``None`` or ``""``: the model itself)."""
    if not spec:
        return "", model
    modules = dict(model.named_modules())
    if spec not in modules:
        names = ", ".join(module_names(model))
        raise ConfigError(f"output module {spec!r} not found in {type(model).__name__}; modules: {names}")
    return spec, modules[spec]
