"""``torch.compile`` for a model that carries feedback hooks."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile(model, **options)``, with Dynamo guarding on module hooks.

    By default (``torch._dynamo.config.skip_nnmodule_hook_guards = True``) Dynamo reuses a graph compiled for one
    instance of a model class for another instance whose modules carry other forward hooks. Here the hooks are the
    learning rule: a DFA model could run a graph traced from a BP model of the same class and silently train by
    backprop (seen with torch 2.13: two MLPs in one process, the second compiled after the first). Guarding on the
    hooks makes each hook set its own graph. The setting is process-wide; it costs a guard per hooked module.
    """
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    return torch.compile(model, **options)
