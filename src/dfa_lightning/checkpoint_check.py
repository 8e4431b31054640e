"""Is ``ckpt_path`` a checkpoint this recipe's module can load? Asked before the run, so that a truncated file or a
checkpoint written by another recipe is one line naming the file, not a torch unpickling or ``load_state_dict``
traceback after the data has been set up."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

SHOWN = 3  # keys named per kind of mismatch; the count says how many more


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's ``state_dict`` (see :func:`read_checkpoint`)."""
    return read_checkpoint(path)["state_dict"]


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint, loaded as Lightning loads it (``weights_only`` by torch's default), memory-mapped when the
    file allows it so that a large checkpoint is not read twice. Raises ``ValueError`` saying why the file is not a
    Lightning checkpoint."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True)
        except RuntimeError as err:  # a legacy (non-zip) file cannot be memory-mapped: read it whole
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(path, map_location="cpu")
    except Exception as err:  # noqa: BLE001 (truncated zip, a text file, a foreign pickle: the reason is the message)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot be read as a checkpoint ({type(err).__name__}: {reason}); truncated while "
                         "copying, or not a file written by torch.save?") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        what = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"is not a Lightning checkpoint (no 'state_dict'; it holds {what}): a model saved with "
                         "torch.save(model.state_dict()) is not a run's checkpoint")
    return checkpoint


def state_dict_mismatch(saved: dict[str, torch.Tensor], module: nn.Module, strict: bool = True,
                        unbuilt: bool = False) -> str | None:
    """What keeps ``module.load_state_dict(saved, strict)`` from working, in one sentence, or None. Parameters that
    a lazy module has not sized yet accept any shape, as ``load_state_dict`` does. ``unbuilt``: layers sized from the
    data (a CTR model's embedding) do not exist yet, so keys the file has and the module lacks are not counted."""
    own = module.state_dict()
    missing = [k for k in own if k not in saved] if strict else []
    unexpected = [k for k in saved if k not in own] if strict and not unbuilt else []
    resized = [f"{k} {tuple(saved[k].shape)} in the file, {tuple(own[k].shape)} here" for k in own
               if k in saved and not isinstance(own[k], UninitializedParameter)
               and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(own[k].shape)]
    parts = []
    for label, items in (("shape mismatch", resized), ("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
            parts.append(f"{len(items)} {label} ({'; '.join(items[:SHOWN])}{more})")
    return ", ".join(parts) if parts else None


def checkpoint_problem(path: str | Path, module: nn.Module, saved: dict[str, torch.Tensor] | None = None) -> str | None:
    """One line on why ``path`` cannot be loaded into ``module`` (a LightningModule), or None when it can; ``saved``
    is its state_dict when already read."""
    if saved is None:
        try:
            saved = read_state_dict(path)
        except ValueError as err:
            return f"ckpt_path {path}: {err}"
    unbuilt = getattr(module, "_built", True) is False and callable(getattr(getattr(module, "model", None), "build",
                                                                            None))
    mismatch = state_dict_mismatch(saved, module, strict=getattr(module, "strict_loading", True), unbuilt=unbuilt)
    if mismatch is None:
        return None
    model = getattr(module, "model", module)
    return (f"ckpt_path {path}: does not fit this recipe's model ({type(model).__name__}): {mismatch}. Was it "
            "written by another recipe, or with other model settings?")
