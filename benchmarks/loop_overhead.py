"""What the Lightning loop adds to a training step, for BP and DFA: ``python -m benchmarks.loop_overhead``.

:mod:`benchmarks.run` times the bare step (forward, loss, backward, optimizer step). A recipe runs the same step
inside ``Trainer.fit``: hooks, the closure, gradient clipping, logging, the finite-loss check. On a GPU a small step
is host-bound, so whatever the loop adds on the host adds to the step time; on the H200 the LM recipes took about
10 ms per step more than the bench's 15 ms (README, "On one H200"). This script measures that addition.

Both loops run the recipe's step: the paper-style Transformer LM, ``TaskModule`` with ``LanguageModeling``, Adam,
gradient-norm clipping at 0.5; DFA is the ``lm_dfa_macro`` callback (shared 512-wide B before the vocabulary). The
Lightning run logs to a CSV logger every 50 steps and has no progress bar; the bare loop does the same work by hand.
Each run times a window of steps after a warm-up, synchronised at its two ends only (a callback marks them in the
Lightning run), so the set-up (Trainer start, the DFA probe) is not counted; the runs are repeated in interleaved
order and the median per-step time is kept.

``--compile MODE`` runs both loops with the model under ``torch.compile(mode=MODE)``, as a recipe's ``compile:`` does
(into ``loop_overhead_<preset>_compiled``): the compilation falls in the warm-up.

Presets: ``tiny`` (the test suite), ``cpu`` (a 2 x 32 LM, vocabulary 64, 4 x 16 tokens: a host-bound step, as small GPU steps are) and
``gpu`` (the recipes' size: 6 x 512, vocabulary 33,278, 64 x 128 tokens, bf16-mixed).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from benchmarks.run import COMPILE_MODES, _at_least, load_average, machine, out_folder
from dfa_lightning.callbacks import FeedbackAlignmentStrategy
from dfa_lightning.compile import compile_model
from dfa_lightning.feedback.engine import FeedbackEngine, optimizer_state_bytes
from dfa_lightning.models.transformer import TransformerLM
from dfa_lightning.module import TaskModule
from dfa_lightning.tasks.language_modeling import LanguageModeling

PRESETS = {
    # steps: (warm-up, warm-up + timed window)
    "tiny": dict(model=dict(vocab_size=32, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=8), streams=2, seq=8,
                 steps=(1, 3), repeats=1, precision="32-true"),  # the test suite
    "cpu": dict(model=dict(vocab_size=64, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=16), streams=4, seq=16,
                steps=(50, 450), repeats=5, precision="32-true"),
    "gpu": dict(model=dict(vocab_size=33_278, max_len=128), streams=64, seq=128, steps=(10, 70), repeats=3,
                precision="bf16-mixed"),
}
DFA = dict(feedback_points=["blocks.*.out"], output="hidden_out", batch_dims=[0, 1], shared_slices=True,
           scale="max_width", seed=0)  # recipes/lm_dfa_macro.yaml
CLIP = 0.5


class RandomTokens(Dataset):
    """Fixed random (x, y) chunks, one batch per item, as WikiTextDataModule serves them."""

    def __init__(self, vocab: int, streams: int, seq: int, batches: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, vocab, (batches, 2, streams, seq), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i, 0], self.data[i, 1]


class Tokens(pl.LightningDataModule):
    def __init__(self, dataset: RandomTokens) -> None:
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None, shuffle=False)


def new_module(preset: dict) -> TaskModule:
    torch.manual_seed(0)
    mode = preset.get("compile")
    return TaskModule(TransformerLM(**preset["model"]), LanguageModeling(), compile={"mode": mode} if mode else False)


class Window(pl.Callback):
    """Times training steps ``first .. last - 1`` (synchronised at both ends only)."""

    def __init__(self, first: int, last: int, device: torch.device) -> None:
        self.first, self.last, self.device = first, last, device
        self.start = self.seconds = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last - 1:
            sync(self.device)
            self.seconds = time.perf_counter() - self.start


def bare(preset: dict, method: str, device: torch.device, data: RandomTokens) -> tuple[float, str | None]:
    """Seconds per training step by hand, as the Lightning loop runs it (the timed window of the preset), and the
    DFA projection it ran."""
    first, last = preset["steps"]
    module = new_module(preset).to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    bf16 = preset["precision"] == "bf16-mixed"
    if method == "dfa":  # the callback's choice of projection, made the same way (probe forward, optimizer state)
        engine = FeedbackEngine(module.model, method="dfa", **DFA)
        probe = tuple(t.to(device) for t in data[0])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            engine.calibrate(lambda: module.task.step(module.model, probe, "train"), optimizer_state_bytes([optimizer]))
        engine.reset()
    run = compile_model(module.model, mode=preset["compile"]) if preset.get("compile") else module.model
    loader = iter(DataLoader(data, batch_size=None, shuffle=False))
    for i in range(last):
        if i == first:
            sync(device)
            start = time.perf_counter()
        x, y = (t.to(device, non_blocking=True) for t in next(loader))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.task.step(run, (x, y), "train").loss
        if not torch.isfinite(loss.detach()).all():  # the loop's finite-loss check, for a like-for-like step
            raise FloatingPointError("non-finite loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - start) / (last - first), engine.mode if method == "dfa" else None


def lightning(preset: dict, method: str, device: torch.device, data: RandomTokens) -> tuple[float, str | None]:
    """Seconds per step of ``Trainer.fit`` over the preset's timed window, and the DFA projection it ran."""
    first, last = preset["steps"]
    module = new_module(preset)
    window = Window(first, last, device)
    callbacks = [window] + ([] if method == "bp" else [FeedbackAlignmentStrategy(method="dfa", verbose=False, **DFA)])
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(max_steps=last, accelerator=device.type, devices=1, precision=preset["precision"],
                             gradient_clip_val=CLIP, logger=CSVLogger(logs), log_every_n_steps=50,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(module, datamodule=Tokens(data))
    return window.seconds / (last - first), callbacks[1].engine.mode if method == "dfa" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(preset_name: str, device: torch.device, log=print, compile_mode: str | None = None) -> dict:
    preset = {**PRESETS[preset_name], "compile": compile_mode}
    first, last = preset["steps"]
    data = RandomTokens(preset["model"]["vocab_size"], preset["streams"], preset["seq"], last)
    loops = {"bare": bare, "lightning": lightning}
    per_step: dict[tuple[str, str], list[float]] = {}
    modes: dict[str, str] = {}  # the DFA projection each loop ran (projection="auto" decides per run)
    for repeat in range(preset["repeats"]):
        for method in ("bp", "dfa"):
            for name, loop in loops.items():
                seconds, mode = loop(preset, method, device, data)
                per_step.setdefault((method, name), []).append(seconds)
                if mode:
                    modes[name] = mode
        log(f"  repeat {repeat + 1}/{preset['repeats']} done")
    rows = []
    for method in ("bp", "dfa"):
        b, lt = (statistics.median(per_step[(method, n)]) for n in loops)
        rows.append(dict(method=method, bare_ms=round(b * 1e3, 3), lightning_ms=round(lt * 1e3, 3),
                         added_ms=round((lt - b) * 1e3, 3),
                         samples_ms={n: [round(t * 1e3, 3) for t in per_step[(method, n)]] for n in loops}))
    return dict(preset=preset_name, compile=compile_mode, steps=[first, last], repeats=preset["repeats"],
                precision=preset["precision"],
                model=preset["model"], tokens=[preset["streams"], preset["seq"]], rows=rows, dfa_projection=modes)


def markdown(result: dict, info: dict) -> str:
    gpu = f", {info['gpu']} (CUDA {info.get('cuda')})" if info.get("gpu") else ""
    lines = [f"# Lightning loop overhead per training step, preset `{result['preset']}`", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {info['cpu']}, {info['cores']} cores{gpu}; torch {info['torch']} ({info['torch_threads']} "
             f"threads), "
             f"pytorch_lightning {pl.__version__}  ",
             f"Date: {result['date']}; load average before {result['load_before']}  ",
             f"Step: TransformerLM {result['model']}, {result['tokens'][0]} x {result['tokens'][1]} tokens, "
             f"{result['precision']}"
             + (f", model under torch.compile (mode {result['compile']})" if result.get("compile") else "")
             + f"; per-step time over steps {result['steps'][0]}-{result['steps'][1] - 1} of each run "
             f"(synchronised at both ends), median of {result['repeats']} interleaved repeats.", "",
             "| method | bare step ms | through Trainer.fit ms | added by the loop ms |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['bare_ms']:.2f} | {r['lightning_ms']:.2f} | {r['added_ms']:+.2f} |")
    modes = result.get("dfa_projection", {})
    lines += ["", f"DFA projection (`auto`, decided in each loop as the callback decides it): bare {modes.get('bare')}, "
              f"Trainer.fit {modes.get('lightning')}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, help="write loop_overhead_<preset>.{md,json} into this folder")
    parser.add_argument("--threads", type=_at_least(1), help="torch CPU threads (the CPU preset's results used 1)")
    parser.add_argument("--compile", metavar="MODE", choices=COMPILE_MODES,
                        help="both loops with the model under torch.compile(mode=MODE)")
    args = parser.parse_args(argv)
    if args.out is not None:
        out_folder(parser, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("the gpu preset needs CUDA", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", module="pytorch_lightning")  # the loop's start-up notices, once per run
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    info = machine(device)
    load_before = load_average()
    result = measure(args.preset, device, log=lambda m: print(m, file=sys.stderr), compile_mode=args.compile)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    result.update(date=time.strftime("%Y-%m-%dT%H:%M:%S"), load_before=load_before, machine=info,
                  command=f"python -m benchmarks.loop_overhead {command}".strip())
    text = markdown(result, info)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"loop_overhead_{args.preset}" + ("_compiled" if args.compile else "")
        (args.out / f"{name}.md").write_text(text)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
