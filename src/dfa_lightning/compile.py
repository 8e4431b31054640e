"""``torch.compile`` for a model that carries feedback hooks."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def compile_model(model: nn.Module, **options: Any) -> Callable[..., Any]:
    """``model`` called through ``torch.compile(**options)``, as one graph with its hooks, guarded on them.

    * One graph: what is compiled is a function that calls the model, so Dynamo traces the model's own forward hooks
      with its forward. ``torch.compile(model)`` traces the hooks of the model itself (the output hook, when the
      error is taken at the model's output) as a second compiled region, and each region costs its own runtime
      wrappers and cache lookup: on a host-bound step (the benchmark's tiny 2 x 32 MLP on the CPU) that made a
      compiled DFA step 1.29x a compiled BP step; in one graph it is 1.07x.
    * Guarded hooks: by default (``torch._dynamo.config.skip_nnmodule_hook_guards = True``) Dynamo reuses a graph
      compiled for one instance of a model class for another instance whose modules carry other forward hooks. Here
      the hooks are the learning rule: a DFA model could run a graph traced from a BP model of the same class and
      silently train by backprop (seen with torch 2.13: two MLPs in one process, the second compiled after the
      first). Guarding on the hooks gives each hook set its own graph. The setting is process-wide.
    * A cache of its own: Dynamo keeps compiled graphs per code object and stops compiling a code object after
      ``cache_size_limit`` (8) recompilations, silently running it eagerly from then on. Every model compiled here
      gets a code object of its own, so a sweep or a benchmark that compiles many models in one process compiles
      each of them.
    """
    torch._dynamo.config.skip_nnmodule_hook_guards = False

    def call(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    call.__code__ = call.__code__.replace(co_name=f"compiled_model_{next(_SERIAL)}")
    return torch.compile(call, **options)


_SERIAL = itertools.count()
