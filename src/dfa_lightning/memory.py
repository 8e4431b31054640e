"""How much memory a device has free, and how much a forward's activations take: enough to refuse a batch that
cannot fit before it is built (on the CPU, the kernel's out-of-memory kill leaves no message at all)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# cgroup v2, then v1: a container's limit is often far below the host's MemAvailable
CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on ``device``; ``None`` where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes "no limit" as ~2**63
            candidates.append(max(0, limit - usage))
    return min(candidates) if candidates else None


def leaf_output_bytes(model: nn.Module, forward: Callable[[], object]) -> int:
    """Bytes of every tensor the leaf modules of ``model`` return during ``forward`` (run without grad): a lower
    bound on what a training forward keeps for its backward, since each layer's output is saved by the layer or
    activation after it (the task's own tensors around the model come on top)."""
    total = 0

    def count(module, args, out) -> None:
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return total


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"
