"""Hidden representations of BP- and DFA-trained graph models, as the paper's Figure 2 (t-SNE of the DFA GCN on Cora).

Two outputs, with nothing beyond torch and tensorboard:

* a **TensorBoard embedding projector** (``SummaryWriter.add_embedding``: PCA, t-SNE and UMAP interactively, coloured
  by class) with one embedding per run: ``python -m tensorboard.main --logdir <logdir>``, tab *Projector*;
* a **PNG** of the 2-D PCA of each run, side by side (left to right in the order given), one colour per class,
  drawn by a tiny rasteriser (no matplotlib).

The inputs are the ``hidden.pt`` files that :mod:`dfa_lightning.graphs_reproduce` saves for every seed-0
node-classification run (``{"hidden": [N, d], "y": [N], "point": name}``: the output of the first feedback point,
eval mode, all nodes, final weights)::

    python -m dfa_lightning.embedding --hidden logs/graphs/Cora/gcn_bp/seed0/hidden.pt \\
        logs/graphs/Cora/gcn_dfa/seed0/hidden.pt --names gcn_bp gcn_dfa \\
        --png benchmarks/results/cora_gcn_hidden_pca.png --logdir logs/embedding

It also prints, per run, the accuracy of a k-nearest-neighbour vote (k=10) in the hidden space, a number for how well
the classes separate there (the paper's Figure 2 makes that point visually).
"""
from __future__ import annotations

import argparse
import struct
import sys
import zlib
from pathlib import Path

import torch

__all__ = ["pca_2d", "knn_accuracy", "rasterize", "write_png", "write_projector", "load_hidden", "main"]

#: Colours per class (tab10).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Project ``x`` [N, d] onto its first two principal components (deterministic sign: largest |loading| > 0)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:2]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    return (x @ (comps * signs).T).float()


def knn_accuracy(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour majority vote (Euclidean) in the space of ``x``."""
    x = x.float()
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    idx = d.topk(k, largest=False).indices
    votes = torch.zeros(x.size(0), int(y.max()) + 1).scatter_add_(1, y[idx], torch.ones(idx.shape))
    return (votes.argmax(1) == y).float().mean().item()


def rasterize(points: torch.Tensor, labels: torch.Tensor, size: int = 400, radius: int = 1,
              margin: int = 8, clip: float = 0.01) -> torch.Tensor:
    """A white ``[size, size, 3]`` uint8 image with each 2-D point as a (2·radius+1)² square in its class colour.

    The axes span the ``clip`` to ``1 - clip`` quantiles of each coordinate (a few outliers would otherwise squash
    the bulk into a corner); points beyond are drawn on the border.
    """
    img = torch.full((size, size, 3), 255, dtype=torch.uint8)
    q = torch.tensor([clip, 1.0 - clip])
    lo, hi = torch.quantile(points.float(), q, dim=0)
    span = (hi - lo).clamp_min(1e-12)
    unit = ((points - lo) / span).clamp(0, 1)
    pix = (unit * (size - 1 - 2 * margin - 2 * radius) + margin + radius).round().long()
    colours = torch.tensor(PALETTE, dtype=torch.uint8)[labels % len(PALETTE)]
    rows, cols = size - 1 - pix[:, 1], pix[:, 0]  # y axis up
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            img[(rows + dr).clamp(0, size - 1), (cols + dc).clamp(0, size - 1)] = colours
    img[[0, -1], :, :] = 0  # frame
    img[:, [0, -1], :] = 0
    return img


def write_png(img: torch.Tensor, path: str | Path) -> None:
    """Write an ``[H, W, 3]`` uint8 tensor as an 8-bit RGB PNG (zlib only)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + bytes(img[r].contiguous().view(-1).tolist()) for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)


def write_projector(runs: dict[str, dict], logdir: str | Path) -> None:
    """One TensorBoard projector embedding per run (``tag`` = run name), nodes labelled by class."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    try:
        for name, run in runs.items():
            writer.add_embedding(run["hidden"].float(), metadata=[f"class {int(c)}" for c in run["y"]], tag=name)
    finally:
        writer.close()


def load_hidden(path: str) -> dict:
    """A ``hidden.pt`` of :mod:`dfa_lightning.graphs_reproduce`, checked: anything else (a run's ``.ckpt``, a
    truncated file) is a ValueError naming the file and what it lacks, not a KeyError or an unpickling traceback."""
    if not Path(path).is_file():
        raise ValueError(f"{path} not found (run dfa_lightning.graphs_reproduce on seed 0 first)")
    try:
        run = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises many kinds for a file that is not its own)
        raise ValueError(f"{path}: not a torch file ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
                         ) from None
    keys = sorted(run) if isinstance(run, dict) else type(run).__name__
    if not isinstance(run, dict) or not {"hidden", "y"} <= set(run):
        raise ValueError(f"{path}: expected a hidden.pt of graphs_reproduce ({{'hidden': [N, d], 'y': [N], 'point': "
                         f"name}}), found {keys}")
    hidden, y = run["hidden"], run["y"]
    if not (isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and isinstance(y, torch.Tensor) and y.dim() == 1
            and len(y) == len(hidden) and len(y) > 10 and not y.is_floating_point()):
        raise ValueError(f"{path}: expected 'hidden' [N, d] and integer 'y' [N] with N > 10, found "
                         f"{tuple(getattr(hidden, 'shape', ()))} and {tuple(getattr(y, 'shape', ()))}")
    run.setdefault("point", "?")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PCA plot and TensorBoard projector of hidden representations")
    parser.add_argument("--hidden", nargs="+", required=True, help="hidden.pt files (graphs_reproduce, seed 0)")
    parser.add_argument("--names", nargs="*", default=None, help="one name per file (default: the run folder)")
    parser.add_argument("--png", default=None, help="write the side-by-side PCA plot here")
    parser.add_argument("--logdir", default=None, help="write a TensorBoard projector here")
    parser.add_argument("--size", type=int, default=400, help="pixels per panel")
    opts = parser.parse_args(argv)
    names = opts.names or [Path(p).parent.parent.name for p in opts.hidden]
    if len(names) != len(opts.hidden):
        parser.error("--names needs one name per --hidden file")
    if len(set(names)) < len(names):  # runs are keyed by name: a repeated one dropped a file without a word
        parser.error(f"--names: each run needs its own name, got {' '.join(names)} (give --names)")
    if opts.size < 16:
        parser.error(f"--size {opts.size}: expected at least 16 pixels a panel")
    from dfa_lightning import studies
    from dfa_lightning.errors import UserError

    try:  # before the runs are read: a folder as --png, or a file as --logdir, was a traceback at the end
        if opts.png:
            studies.check_writable(opts.png, "--png")
        if opts.logdir:
            studies.check_writable(opts.logdir, "--logdir", folder=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = {}
    for name, path in zip(names, opts.hidden):
        try:
            runs[name] = load_hidden(path)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    for name, run in runs.items():
        h = run["hidden"]
        print(f"{name}: hidden {tuple(h.shape)} at {run['point']!r}; 10-NN accuracy in hidden space "
              f"{knn_accuracy(h, run['y']):.3f}, in its 2-D PCA {knn_accuracy(pca_2d(h), run['y']):.3f}")
    if opts.png:
        panels = [rasterize(pca_2d(r["hidden"]), r["y"], opts.size) for r in runs.values()]
        gap = torch.full((opts.size, 6, 3), 255, dtype=torch.uint8)
        img = torch.cat([t for p in panels for t in (p, gap)][:-1], dim=1)
        write_png(img, opts.png)
        print(f"PCA plot (left to right: {', '.join(runs)}) -> {opts.png}")
    if opts.logdir:
        write_projector(runs, opts.logdir)
        print(f"TensorBoard projector -> {opts.logdir} (python -m tensorboard.main --logdir {opts.logdir}, tab Projector)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
