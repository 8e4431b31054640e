"""Small-scale CPU proxy: BP vs DFA feedback operators for a Transformer LM on WikiText-2.

Not the paper's setting (6x512, 8192-token batches, 20 epochs on WikiText-103): a 2-block post-LN TransformerLM
trained for a few thousand steps, the same steps, data order, initialisation and optimizer for every variant. It
compares the final validation perplexity (and wall time per step) of

* ``bp``: backprop;
* ``shallow``: the macro points cut, no feedback (only the decoder trains): the floor DFA must beat;
* ``dfa_before``: DFA macro, error before the vocabulary (``output: hidden_out``), dense B (the paper's choice);
* ``before_shared``: as ``dfa_before`` in TinyDFA's layout, one ``d_model x d_model`` matrix whose ``B e`` every
  block receives (the paper's code: blocks of one width get the same signal), one ``N x d x d`` product per step;
* ``micro_before`` / ``micro_before_shared``: micro points (after the attention sub-layer, the FFN activation and the
  block), error before the vocabulary, independent B_i or TinyDFA's layout (one ``d x d_ff`` matrix, each point
  takes its first columns);
* ``after_dense`` / ``after_lowrank`` / ``after_sparse``: DFA macro with the error after the vocabulary (``output:
  null``, e has V dims: 8,000 BPE tokens or 33,278 words) through a dense, low-rank (rank 64) or sparse (16
  non-zeros per column) B;
* ``after_dense_shared``: one dense ``V x d_model`` matrix whose ``B e`` every block receives (TinyDFA's layout:
  the projection costs what BP's gradient through the decoder costs);
* ``after_lowrank_shared``: the shared layout through a rank-64 ``B = UV`` (every block receives ``(e U) V``);
* ``after_lowrank_shared_bf16proj``: as ``after_lowrank_shared`` with ``projection_dtype: gradient`` (the
  projection in the error's dtype: bf16 under ``--precision bf16-mixed``; the same as fp32 otherwise);
* ``after_dense_sign`` / ``after_dense_ternary``: as ``after_dense`` with the sign (or the ternarised value) of
  the error sent through B, as an optical co-processor would receive it.

Run (from the repository root; about 5 min per variant on one CPU core, 70 min for the 14):

    DFA_DATA_DIR=../shared/data python benchmarks/lm_operators.py --tokenizer bpe --streams 16 --seq-len 64 \
        --steps 2000 --out benchmarks/results/lm_operators

(the defaults, word level and 250 steps of 8 x 32 tokens, are the earlier, shorter proxy kept in
``lm_operators_word_250steps.md``) writes ``lm_operators.json`` and ``lm_operators.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from dfa_lightning.callbacks import FeedbackAlignmentStrategy
from dfa_lightning.data.wikitext import WikiTextDataModule
from dfa_lightning.models.transformer import ERROR_AT, FEEDBACK_POINTS, TransformerLM
from dfa_lightning.module import TaskModule
from dfa_lightning.tasks.language_modeling import LanguageModeling

MACRO, MICRO = FEEDBACK_POINTS["macro"], FEEDBACK_POINTS["micro"]
VARIANTS: dict[str, dict] = {
    "bp": dict(method="bp"),
    "shallow": dict(method="shallow", feedback_points=MACRO, output=ERROR_AT["before_vocab"]),
    "dfa_before": dict(method="dfa", feedback_points=MACRO, output=ERROR_AT["before_vocab"]),
    "before_shared": dict(method="dfa", feedback_points=MACRO, output=ERROR_AT["before_vocab"], shared_slices=True,
                          scale="max_width"),
    "micro_before": dict(method="dfa", feedback_points=MICRO, output=ERROR_AT["before_vocab"]),
    "micro_before_shared": dict(method="dfa", feedback_points=MICRO, output=ERROR_AT["before_vocab"],
                                shared_slices=True, scale="max_width"),
    "after_dense": dict(method="dfa", feedback_points=MACRO, output=ERROR_AT["after_vocab"]),
    "after_dense_shared": dict(method="dfa", feedback_points=MACRO, output=None, shared_slices=True,
                               scale="max_width"),
    "after_lowrank": dict(method="dfa", feedback_points=MACRO, output=None, operator="lowrank", rank=64),
    "after_lowrank_shared": dict(method="dfa", feedback_points=MACRO, output=None, operator="lowrank", rank=64,
                                 shared_slices=True, scale="max_width"),
    "after_lowrank_shared_bf16proj": dict(method="dfa", feedback_points=MACRO, output=None, operator="lowrank",
                                          rank=64, shared_slices=True, scale="max_width", projection_dtype="gradient"),
    "after_sparse": dict(method="dfa", feedback_points=MACRO, output=None, operator="sparse", nnz=16),
    "after_dense_sign": dict(method="dfa", feedback_points=MACRO, output=None, error="sign"),
    "after_dense_ternary": dict(method="dfa", feedback_points=MACRO, output=None, error="ternary"),
}


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._t)


def run_variant(name: str, args) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    dm = WikiTextDataModule(streams=args.streams, seq_len=args.seq_len, cache_dir=args.cache_dir,
                            tokenizer=args.tokenizer, vocab_size=args.vocab_size)
    dm.setup("fit")
    model = TransformerLM(dm.vocab_size, d_model=args.d_model, n_heads=args.heads, d_ff=4 * args.d_model,
                          n_layers=args.layers, dropout=args.dropout, max_len=args.seq_len)
    module = TaskModule(model, LanguageModeling(),
                        optimizer=lambda p: torch.optim.Adam(p, lr=args.lr, betas=(0.9, 0.999)))
    strategy = FeedbackAlignmentStrategy(batch_dims=[0, 1], seed=args.seed, verbose=False, **VARIANTS[name])
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=args.steps,
                         limit_val_batches=args.val_batches, num_sanity_val_steps=0, gradient_clip_val=0.5,
                         callbacks=[strategy, timer], deterministic=True, precision=args.precision)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - start
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    steady = sorted(timer.times[5:] or timer.times)  # the median: robust to a paused or preempted step
    result = {"variant": name, "config": {k: v for k, v in VARIANTS[name].items()},
              "val_ppl": round(val["val/ppl"], 2), "val_loss": round(val["val/loss"], 4),
              "steps": len(timer.times), "s_per_step": round(steady[len(steady) // 2], 4), "fit_s": round(fit_s, 1)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--tokenizer", default="word", choices=["word", "bpe"])
    parser.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary (ignored by word)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-batches", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed (autocast)")
    parser.add_argument("--out", default="benchmarks/results/lm_operators")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "variants", "cache_dir")}
    setup["val_tokens"] = args.val_batches * args.streams * args.seq_len
    dm = WikiTextDataModule(cache_dir=args.cache_dir, tokenizer=args.tokenizer, vocab_size=args.vocab_size)
    dm.load()
    setup["vocab"], setup["train_tokens"] = dm.vocab_size, int(dm.ids["train"].numel())
    load = [round(x, 2) for x in os.getloadavg()]
    data = os.environ.get("DFA_DATA_DIR")  # the data root this run read, as it was given (none: the cache's)
    command = (f"DFA_DATA_DIR={data} " if data else "") + " ".join(["python benchmarks/lm_operators.py",
                                                                     *sys.argv[1:]])
    payload = {"benchmark": "lm_operators", "command": command, "setup": setup, "torch": torch.__version__,
               "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} thread(s); "
                          f"load average at start {load}",
               "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants:  # results are rewritten after each variant: an interrupted run keeps what it did
        payload["results"].append(run_variant(name, args))
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        lines = [f"| {r['variant']} | {r['val_ppl']:.1f} | {r['val_loss']:.3f} | {r['s_per_step']:.3f} |"
                 for r in payload["results"]]
        out.with_suffix(".md").write_text(render_md(payload, lines))


def render_md(payload: dict, rows: list[str]) -> str:
    s = payload["setup"]
    tokens = "word level" if s["tokenizer"] == "word" else "BPE (`tokenizers`, trained on the train split)"
    return "\n".join([
        "# Transformer LM on WikiText-2: BP vs DFA feedback operators (small CPU proxy)",
        "",
        "**A small-scale CPU proxy, not the paper's setting.** The paper (Table 5) trains a 6x512 post-LN Transformer "
        "on WikiText-103 with 32k BPE, 8192-token batches, for 20 epochs (BP 29.8, DFA macro 52.0, micro 93.3, "
        "shallow 428). "
        f"Here: {s['layers']} blocks x d_model {s['d_model']} ({s['heads']} heads, FFN {4 * s['d_model']}), post-LN, "
        f"dropout {s['dropout']}, WikiText-2 {tokens} (V = {s['vocab']:,}), {s['streams']} streams x {s['seq_len']} "
        f"tokens, {s['steps']} steps (~{s['steps'] * s['streams'] * s['seq_len'] / s['train_tokens']:.2f} epoch), "
        f"Adam lr {s['lr']} "
        f"beta2 0.999, grad clip 0.5, seed {s['seed']}; validation perplexity on the first {s['val_tokens']:,} "
        "validation tokens (each stream's first chunks) after the last step. One seed: differences of a few "
        f"percent are noise. Time per step is wall time on {s['threads']} CPU thread(s) (machine below): compare "
        "variants only roughly.",
        "",
        f"Machine: {payload['machine']}; torch {payload['torch']}.",
        "",
        f"Command: `{payload['command']}` (script: `benchmarks/lm_operators.py`; `--cache-dir` only moves the "
        "token-id cache).",
        "",
        "| variant | val ppl | val loss | s / step (median) |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        "Variants (all DFA variants: macro points `blocks.*.out` unless `micro`, `batch_dims: [0, 1]`, uniform B, "
        "per-layer scale; the `shared` ones scale by 1/sqrt(max width), as TinyDFA): "
        "`bp` backprop; `shallow` macro cuts without feedback (only the decoder trains); `dfa_before` error before the "
        "vocabulary (`output: hidden_out`, dense B d_model x d_model per block, the paper's default), `before_shared` "
        "the same in TinyDFA's layout (one B whose B e every block receives); `micro_before` / "
        "`micro_before_shared`: micro points (after the attention sub-layer, the FFN activation, the block), error "
        "before the vocabulary, independent B_i / one d_model x d_ff B whose first columns each point takes; `after_*` "
        f"error after the vocabulary (`output: null`, e over the {s['vocab']:,} tokens) through a dense B "
        "(`shared`: one matrix whose B e every block receives, as TinyDFA), a low-rank B (rank 64; `shared` as "
        "above), a sparse B (16 non-zeros per column), or the dense B fed the sign (`sign`) or the ternarised "
        "value (`ternary`) of e.",
        "",
    ])


if __name__ == "__main__":
    main()
