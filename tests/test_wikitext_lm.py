"""WikiText-2 data, the language-modelling task and the LM recipes, on the real files (copied to tmp first)."""
from __future__ import annotations

import hashlib
import math
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml

from dfa_lightning.callbacks import FeedbackAlignmentStrategy
from dfa_lightning.data.wikitext import ARCHIVES, StreamChunks, WikiTextDataModule, batchify
from dfa_lightning.errors import ConfigError, DatasetError
from dfa_lightning.models.transformer import ERROR_AT, FEEDBACK_POINTS, TransformerLM
from dfa_lightning.module import TaskModule
from dfa_lightning.tasks.language_modeling import LanguageModeling, TokenPerplexity

REPO = Path(__file__).resolve().parents[1]
WT2_TOKENS = {"train": 2_088_628, "valid": 217_646, "test": 245_569}
WT2_VOCAB = 33_278
LM_RECIPES = sorted((REPO / "recipes").glob("lm_*.yaml"))


@pytest.fixture(scope="module")
def wt2_root(tmp_path_factory) -> Path:
    """A private copy of shared/data/wikitext-2 (module scope: copied and encoded once for these tests)."""
    from conftest import SHARED_DATA

    src = SHARED_DATA / "wikitext-2"
    if not all((src / f"{s}.txt").is_file() for s in WT2_TOKENS):
        pytest.skip(f"WikiText-2 not found at {src} (set DFA_DATA_DIR)")
    root = tmp_path_factory.mktemp("wt2") / "data"
    shutil.copytree(src, root / "wikitext-2")
    return root


@pytest.fixture(scope="module")
def wt2(wt2_root) -> WikiTextDataModule:
    dm = WikiTextDataModule(root=str(wt2_root), cache_dir=str(wt2_root.parent / "cache"), download=False)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------------ data
def test_real_wikitext2_has_the_documented_token_counts_and_vocabulary(wt2):
    assert {s: ids.numel() for s, ids in wt2.ids.items()} == WT2_TOKENS
    assert wt2.vocab_size == WT2_VOCAB and wt2.model_hints() == {"vocab_size": WT2_VOCAB}
    # word_language_model Corpus: ids in order of first appearance, the file starts with an empty line
    assert wt2.vocab[:4] == ["<eos>", "=", "Valkyria", "Chronicles"]
    assert wt2.ids["train"][:5].tolist() == [0, 1, 2, 3, 4]
    assert max(int(ids.max()) for ids in wt2.ids.values()) == WT2_VOCAB - 1


def test_token_ids_are_cached_and_the_cache_follows_the_file(wt2, wt2_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(wt2_root / "wikitext-2", root / "wikitext-2")
    cache = wt2_root.parent / "cache"  # keyed by content: the copy reuses the fixture's cache
    first = WikiTextDataModule(root=str(root), cache_dir=str(cache), download=False)
    first.setup()
    again = WikiTextDataModule(root=str(root), cache_dir=str(cache), download=False)
    again.setup()
    assert again.cache_path == first.cache_path == wt2.cache_path
    assert torch.equal(again.ids["valid"], first.ids["valid"])
    with open(root / "wikitext-2" / "test.txt", "a", encoding="utf-8") as fh:
        fh.write(" a new line\n")
    edited = WikiTextDataModule(root=str(root), cache_dir=str(cache), download=False, verify=False)
    edited.setup()
    assert edited.cache_path != first.cache_path
    assert edited.ids["test"].numel() == WT2_TOKENS["test"] + 4
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]


def test_batchify_shapes_and_next_token_targets():
    ids = torch.arange(103)
    rows = batchify(ids, 4)  # 103 // 4 = 25 tokens per stream, 3 dropped
    assert rows.shape == (4, 25) and rows[1, 0] == 25 and rows[3, -1] == 99
    chunks = StreamChunks(ids, streams=4, seq_len=10)
    assert len(chunks) == 3  # targets need one token more: 24 positions -> 10 + 10 + 4
    shapes = [tuple(chunks[i][0].shape) for i in range(3)]
    assert shapes == [(4, 10), (4, 10), (4, 4)]
    for i in range(3):
        x, y = chunks[i]
        assert x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1)  # ids are positions here: the target is the next token of the same stream
    x1, _ = chunks[1]
    assert torch.equal(x1[:, 0], chunks[0][1][:, -1])  # batch i+1 continues each stream of batch i
    with pytest.raises(IndexError):
        chunks[3]


def test_a_stream_whose_positions_fill_whole_chunks_gets_no_empty_last_chunk():
    """25 tokens per stream give 24 input positions = 3 x 8: three chunks, none empty (an empty
    [streams, 0] batch reached the model)."""
    chunks = StreamChunks(torch.arange(50), streams=2, seq_len=8)  # 25 tokens per stream, 24 positions
    assert len(chunks) == 3 and [chunks[i][0].shape[1] for i in range(3)] == [8, 8, 8]
    assert chunks[2][1][0, -1] == 24  # the last target is the stream's last token
    with pytest.raises(IndexError):
        chunks[3]


def test_real_batches_have_paper_shape(wt2):
    loader = wt2.train_dataloader()
    x, y = next(iter(loader))
    assert x.shape == y.shape == (64, 128)
    assert torch.equal(x[:, 1:], y[:, :-1])
    per_stream = WT2_TOKENS["train"] // 64
    assert len(loader) == math.ceil((per_stream - 1) / 128)
    assert sum(b[1].numel() for b in wt2.val_dataloader()) == 64 * (WT2_TOKENS["valid"] // 64 - 1)


@pytest.mark.parametrize("download", [False, True])
def test_missing_file_is_a_dataset_error_naming_it(wt2_root, tmp_path, monkeypatch, download):
    """With downloads on, a folder holding the user's own train and test files was silently replaced by the
    official release (another vocabulary, another text): the run trained on data it was not given."""
    import dfa_lightning.data.wikitext as wikitext

    monkeypatch.setattr(wikitext, "download_file", lambda *a, **k: pytest.fail("downloaded over the user's files"))
    root = tmp_path / "data"
    (root / "wikitext-2").mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copy(wt2_root / "wikitext-2" / f"{split}.txt", root / "wikitext-2")
    dm = WikiTextDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), download=download)
    with pytest.raises(DatasetError) as err:
        dm.setup()
    message = str(err.value)
    assert f"missing valid.txt in {root / 'wikitext-2'}, which holds train.txt, test.txt:" in message
    assert "wikitext-2-v1.zip" in message and "\n" not in message


def test_an_empty_data_folder_says_it_falls_back_to_the_cache_copy(wt2_root, tmp_path):
    (tmp_path / "empty").mkdir()
    shutil.copytree(wt2_root / "wikitext-2", tmp_path / "cache" / "wikitext-2")
    dm = WikiTextDataModule(root=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"), download=False)
    with pytest.warns(UserWarning, match=rf"wikitext-2: not in {re.escape(str(tmp_path / 'empty' / 'wikitext-2'))} "
                                         rf"\(from `root:`\); using the copy in the download cache "
                                         rf"{re.escape(str(tmp_path / 'cache' / 'wikitext-2'))}"):
        files = dm.text_files()
    assert files["train"] == tmp_path / "cache" / "wikitext-2" / "train.txt"


def _wt2_copy_with(wt2_root: Path, tmp_path: Path, split: str, content: bytes) -> Path:
    """A copy of WikiText-2 whose ``split`` file holds ``content``; returns that file."""
    root = tmp_path / "data"
    shutil.copytree(wt2_root / "wikitext-2", root / "wikitext-2")
    (root / "wikitext-2" / f"{split}.txt").write_bytes(content)
    return root / "wikitext-2" / f"{split}.txt"


def _setup_error(path: Path, tmp_path: Path, **kwargs) -> str:
    kwargs.setdefault("verify", False)  # past the check against the release: the file's own fault is named
    dm = WikiTextDataModule(root=str(path.parents[1]), cache_dir=str(tmp_path / "cache"), download=False, **kwargs)
    with pytest.raises(DatasetError) as err:
        dm.setup("fit")
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_an_empty_split_file_is_named_at_setup_before_any_training(wt2_root, tmp_path, split):
    path = _wt2_copy_with(wt2_root, tmp_path, split, b"")  # (an empty train.txt was a KeyError: '<eos>')
    assert _setup_error(path, tmp_path).startswith(f"{path}: 0 tokens, too few for 64 streams")


def test_a_too_short_train_file_is_named_not_the_first_valid_word_it_lacks(wt2_root, tmp_path):
    path = _wt2_copy_with(wt2_root, tmp_path, "train", b"one line\n")
    assert _setup_error(path, tmp_path).startswith(f"{path}: 3 tokens, too few for 64 streams")


def test_a_split_too_short_for_more_streams_is_named_at_its_current_path_when_the_cache_is_reused(wt2_root, tmp_path):
    first = _wt2_copy_with(wt2_root, tmp_path / "a", "test", b"three tokens\n")
    WikiTextDataModule(root=str(first.parents[1]), cache_dir=str(tmp_path / "cache"), download=False,
                       eval_streams=1, verify=False).setup("fit")  # fine for one stream; cached (keyed by content)
    moved = tmp_path / "b" / "data"
    shutil.copytree(first.parents[1], moved)
    path = moved / "wikitext-2" / "test.txt"
    assert _setup_error(path, tmp_path, eval_streams=2).startswith(f"{path}: 3 tokens, too few for 2 streams")


def test_too_many_streams_for_a_whole_file_names_the_setting_and_its_largest_value(wt2_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(wt2_root / "wikitext-2", root / "wikitext-2")
    message = _setup_error(root / "wikitext-2" / "train.txt", tmp_path, streams=2_000_000)
    assert f"{WT2_TOKENS['train']} tokens, too few for 2000000 streams" in message
    assert f"lower data.init_args.streams (at most {WT2_TOKENS['train'] // 2} for this file)" in message


def test_a_truncated_official_file_is_named_with_its_size_unless_verify_is_off(wt2_root, tmp_path):
    """A test.txt cut at 20 kB was read without a word: its perplexity (2 % of the split) looked like a result."""
    original = (wt2_root / "wikitext-2" / "test.txt").read_bytes()
    path = _wt2_copy_with(wt2_root, tmp_path, "test", original[:20_000])
    message = _setup_error(path, tmp_path, verify=True)
    assert message.startswith(f"{path}: not the official wikitext-2 test split (20,000 bytes, sha256 ")
    assert "the release's is 1,256,449 bytes" in message and "data.init_args.verify: false" in message
    dm = WikiTextDataModule(root=str(path.parents[1]), cache_dir=str(tmp_path / "cache"), download=False, verify=False,
                            eval_streams=4)
    dm.setup("fit")  # on purpose: read as it is
    assert 0 < dm.ids["test"].numel() < WT2_TOKENS["test"] // 10


def test_a_file_that_is_not_utf8_is_named_with_its_line_and_byte(wt2_root, tmp_path):
    path = _wt2_copy_with(wt2_root, tmp_path, "valid", b"a fine line\n = heading = \n\xff\xfe\x00binary\n")
    assert _setup_error(path, tmp_path).startswith(f"{path}:3: not UTF-8 text (byte 26: invalid start byte)")


def test_a_zero_filled_file_is_named_as_binary(wt2_root, tmp_path):
    path = _wt2_copy_with(wt2_root, tmp_path, "test", b"a fine line\n" + bytes(4096))  # valid UTF-8, but NULs
    assert _setup_error(path, tmp_path).startswith(f"{path}:2: a NUL byte: binary data")


def _tiny_wikitext(tmp_path: Path, texts: dict[str, str]) -> Path:
    root = tmp_path / "data" / "wikitext-2"
    root.mkdir(parents=True)
    for split, text in texts.items():
        (root / f"{split}.txt").write_text(text, encoding="utf-8")
    return root.parent


def test_bpe_tokenizer_trains_on_train_and_round_trips(wt2_root, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    # the first 300 lines of each file: the code path, not the real vocabulary
    root = _tiny_wikitext(tmp_path, {split: "".join((wt2_root / "wikitext-2" / f"{split}.txt").read_text(
        encoding="utf-8").splitlines(keepends=True)[:300]) for split in WT2_TOKENS}) / "wikitext-2"
    dm = WikiTextDataModule(root=str(root.parent), cache_dir=str(tmp_path / "cache"), tokenizer="bpe",
                            vocab_size=500, streams=2, seq_len=8, download=False, verify=False)
    dm.setup()
    assert dm.vocab_size == 500 and dm.vocab[:2] == ["<unk>", "<eos>"]
    tok = tokenizers.Tokenizer.from_file(str(dm.cache_path / "tokenizer.json"))
    first = (root / "valid.txt").read_text(encoding="utf-8").splitlines()[1]  # " = Homarus gammarus = "
    n = len(tok.encode(first).ids)
    assert tok.decode(dm.ids["valid"][1 : 1 + n].tolist()) == first.strip()
    assert int(dm.ids["valid"][0]) == int(dm.ids["valid"][1 + n]) == 1  # <eos> ends every line (the first is empty)


def test_missing_root_and_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        WikiTextDataModule(root=str(tmp_path / "nowhere"), download=False).setup()
    with pytest.raises(ConfigError, match="unknown name"):
        WikiTextDataModule(name="wikitext-5")
    with pytest.raises(ConfigError, match="tokenizer"):
        WikiTextDataModule(tokenizer="char")
    with pytest.raises(ConfigError, match="eval_streams must be >= 1, got 0"):  # it was let through as 0
        WikiTextDataModule(eval_streams=0)


def test_model_with_a_smaller_vocabulary_is_a_config_error(wt2, tmp_path):
    module = TaskModule(TransformerLM(1000, d_model=16, n_heads=2, d_ff=16, n_layers=1), LanguageModeling())
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=1, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="vocabulary 1000 .* smaller than the wikitext-2 word vocabulary 33278"):
        trainer.fit(module, datamodule=wt2)


def test_a_model_shorter_than_the_datas_sequences_is_a_config_error_before_a_step(wt2, tmp_path):
    """Raising seq_len without max_len (the CPU overlay sets max_len 64) was a ValueError traceback from the probe."""
    module = TaskModule(TransformerLM(wt2.vocab_size, d_model=16, n_heads=2, d_ff=16, n_layers=1, max_len=64),
                        LanguageModeling())
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=1, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"max_len 64 is shorter than the data's seq_len 128; set "
                                          r"model.model.init_args.max_len to at least 128"):
        trainer.fit(module, datamodule=wt2)


@pytest.mark.parametrize("recipe", LM_RECIPES, ids=[r.stem for r in LM_RECIPES])
def test_recipe_vocab_size_matches_the_data(recipe, wt2):
    config = yaml.safe_load(recipe.read_text())
    assert config["model"]["model"]["init_args"]["vocab_size"] == wt2.vocab_size


# ------------------------------------------------------------------------------------------------ task
def test_perplexity_is_exp_of_mean_token_cross_entropy():
    torch.manual_seed(0)
    task = LanguageModeling()
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    batches = [(torch.randint(0, 50, (3, t)), torch.randint(0, 50, (3, t))) for t in (7, 7, 2)]  # uneven sizes
    logits, targets = [], []
    for batch in batches:
        out = task.step(model, batch, "val")
        assert out.batch_size == batch[1].numel() and out.output.shape == (*batch[0].shape, 50)
        task.update_metrics(out, batch, "val")
        logits.append(out.output.reshape(-1, 50))
        targets.append(batch[1].reshape(-1))
    expected = torch.exp(F.cross_entropy(torch.cat(logits), torch.cat(targets)))
    got = task.stage_metrics("val")["ppl"].compute()
    assert torch.allclose(got, expected, rtol=1e-5)
    assert task.monitor == "val/loss" and task.monitor_mode == "min"


def test_token_perplexity_metric_weights_by_tokens():
    metric = TokenPerplexity()
    metric.update(torch.tensor(1.0), torch.tensor(30))
    metric.update(torch.tensor(4.0), torch.tensor(10))
    assert torch.allclose(metric.compute(), torch.exp(torch.tensor(70.0 / 40)))


# ------------------------------------------------------------------------------------------------ training
def _val_ppl(trainer, module, dm) -> float:
    return trainer.validate(module, datamodule=dm, verbose=False)[0]["val/ppl"]


@pytest.mark.parametrize("method", ["bp", "dfa"])
def test_tiny_transformer_learns_wikitext2_by_bp_and_dfa(method, wt2_root, tmp_path):
    """2 x 64 post-LN TransformerLM, 8 streams x 16 tokens, 30 steps: validation perplexity drops (loose check)."""
    pl.seed_everything(0, verbose=False)
    dm = WikiTextDataModule(root=str(wt2_root), cache_dir=str(wt2_root.parent / "cache"), streams=8, seq_len=16,
                            download=False)
    model = TransformerLM(WT2_VOCAB, d_model=64, n_heads=2, d_ff=128, n_layers=2, dropout=0.0, max_len=16)
    module = TaskModule(model, LanguageModeling(), optimizer=lambda p: torch.optim.Adam(p, lr=5e-3))
    strategy = FeedbackAlignmentStrategy(method=method, feedback_points=FEEDBACK_POINTS["macro"],
                                         output=ERROR_AT["before_vocab"], batch_dims=[0, 1], seed=1, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=30, limit_val_batches=4,
                         num_sanity_val_steps=0, gradient_clip_val=0.5, default_root_dir=tmp_path,
                         callbacks=[strategy])
    before = _val_ppl(trainer, module, dm)
    block = model.blocks[0].ffn.fc.weight.detach().clone()
    trainer.fit(module, datamodule=dm)
    after = _val_ppl(trainer, module, dm)
    print(f"{method}: val ppl {before:.0f} -> {after:.0f}")
    assert math.isfinite(after) and after < 0.5 * before, (before, after)
    assert not torch.equal(block, model.blocks[0].ffn.fc.weight)  # the first block learned (BP or feedback)
    if method == "dfa":
        assert strategy.engine is not None and strategy.engine.matrix is not None


@pytest.mark.parametrize("placement, projection", [("micro", "per_point"), ("macro", "fused")])
def test_compiled_dfa_lm_trains_on_wikitext2_as_the_eager_one(placement, projection, wt2_root, tmp_path):
    """``compile`` on real text: a 2 x 32 LM, error after the vocabulary through a shared low-rank B, 6 steps with
    gradient clipping and validation, compiled (aot_eager: traced as Inductor would see it) and eager: the same
    weights. Micro feedback puts a point after every attention and MLP (per point: one token per point). The eager
    run uses tokens too (`receiver: token`), the compiled step's own algorithm: matmul receivers give the same
    gradients (to 4e-16 in fp64, tests/test_engine.py) but round in another order, and Adam's first steps turn
    rounding-level differences of near-zero gradient entries into lr-sized ones."""
    runs = {}
    for compile_ in (False, {"backend": "aot_eager"}):
        torch._dynamo.reset()
        pl.seed_everything(0, verbose=False)
        dm = WikiTextDataModule(root=str(wt2_root), cache_dir=str(wt2_root.parent / "cache"), streams=4, seq_len=8,
                                download=False)
        model = TransformerLM(WT2_VOCAB, d_model=32, n_heads=2, d_ff=64, n_layers=2, dropout=0.0, max_len=8)
        module = TaskModule(model, LanguageModeling(), optimizer=lambda p: torch.optim.Adam(p, lr=5e-3),
                            compile=compile_)
        strategy = FeedbackAlignmentStrategy(feedback_points=FEEDBACK_POINTS[placement], output=ERROR_AT["after_vocab"],
                                             batch_dims=[0, 1], operator="lowrank", rank=8, shared_slices=True,
                                             projection=projection, receiver="token", seed=1, verbose=False)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, max_steps=6, limit_val_batches=2,
                             val_check_interval=3, num_sanity_val_steps=0, gradient_clip_val=0.5,
                             default_root_dir=tmp_path, callbacks=[strategy])
        trainer.fit(module, datamodule=dm)
        assert strategy.engine.mode == projection and (module.runner is not model) == bool(compile_)
        runs[bool(compile_)] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, p in runs[False].items():
        torch.testing.assert_close(runs[True][name], p, atol=1e-5, rtol=1e-4, msg=name)


def _strategy_settings(recipe: str) -> dict:
    config = yaml.safe_load((REPO / "recipes" / recipe).read_text())
    return next(c["init_args"] for c in config["trainer"]["callbacks"]
                if isinstance(c, dict) and c["class_path"].endswith("FeedbackAlignmentStrategy"))


@pytest.mark.parametrize("recipe, d_out, slices", [
    # error before the vocabulary: one dense 64 x 64 B; both blocks receive the same B e (TinyDFA's layout)
    ("lm_dfa_macro.yaml", 64, ((0, 64), (0, 64))),
    # micro: one 64 x 128 B; the 64-wide points take its first 64 columns, the FFN activation all 128
    ("lm_dfa_micro.yaml", 64, ((0, 64), (0, 128), (0, 64)) * 2),
    # after the vocabulary: B = UV (rank 64), every block receives the same (e U) V
    ("lm_dfa_macro_after_vocab.yaml", WT2_VOCAB, ((0, 64), (0, 64))),
])
def test_lm_recipe_feedback_settings_train_every_block_from_one_shared_signal(recipe, d_out, slices, wt2_root,
                                                                               tmp_path):
    """Each LM DFA recipe's own feedback settings on a tiny 2 x 64 LM (d_ff 128): the layout is TinyDFA's (one
    product, column-prefix slices), and 30 steps on WikiText-2 halve the validation perplexity."""
    settings = _strategy_settings(recipe)
    assert settings["shared_slices"] is True and settings["scale"] == "max_width"
    if recipe.endswith("after_vocab.yaml"):
        assert settings["operator"] == "lowrank" and settings["output"] is None
        assert settings["projection_dtype"] == "gradient"  # bf16 under AMP: no perplexity cost on the proxy
    else:
        assert settings["output"] == ERROR_AT["before_vocab"]
    pl.seed_everything(0, verbose=False)
    dm = WikiTextDataModule(root=str(wt2_root), cache_dir=str(wt2_root.parent / "cache"), streams=8, seq_len=16,
                            download=False)
    model = TransformerLM(WT2_VOCAB, d_model=64, n_heads=2, d_ff=128, n_layers=2, dropout=0.0, max_len=16)
    module = TaskModule(model, LanguageModeling(), optimizer=lambda p: torch.optim.Adam(p, lr=5e-3))
    strategy = FeedbackAlignmentStrategy(**settings, seed=1, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=30, limit_val_batches=4,
                         num_sanity_val_steps=0, gradient_clip_val=0.5, default_root_dir=tmp_path,
                         callbacks=[strategy])
    before = _val_ppl(trainer, module, dm)
    blocks = [b.attn.qkv.weight.detach().clone() for b in model.blocks]
    trainer.fit(module, datamodule=dm)
    after = _val_ppl(trainer, module, dm)
    engine = strategy.engine
    assert engine.d_out == d_out and engine._layout.slices == slices
    assert engine._layout.total == max(stop for _, stop in slices)  # one product, as wide as the widest point
    assert math.isfinite(after) and after < 0.5 * before, (before, after)
    for b, w in zip(model.blocks, blocks):
        assert not torch.equal(w, b.attn.qkv.weight)  # every block's attention learned


def test_lm_operator_proxy_script_runs_each_variant_and_records_its_setup(wt2_root, tmp_path, monkeypatch):
    """`benchmarks/lm_operators.py` (the proxy behind the README's operator table) end to end on real WikiText-2 at
    a toy size, under bf16 autocast: every asked variant trains, validates and lands in the JSON and markdown."""
    import json
    import sys

    from benchmarks import lm_operators

    monkeypatch.setenv("DFA_DATA_DIR", str(wt2_root))
    out = tmp_path / "proxy"
    monkeypatch.setattr(sys, "argv", [
        "lm_operators.py", "--variants", "bp", "before_shared", "after_lowrank_shared_bf16proj", "--steps", "3",
        "--d-model", "16", "--heads", "2", "--layers", "1", "--streams", "2", "--seq-len", "8", "--val-batches", "2",
        "--precision", "bf16-mixed", "--cache-dir", str(wt2_root.parent / "cache"), "--out", str(out)])
    lm_operators.main()
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["setup"]["precision"] == "bf16-mixed" and payload["setup"]["vocab"] == WT2_VOCAB
    results = {r["variant"]: r for r in payload["results"]}
    assert list(results) == ["bp", "before_shared", "after_lowrank_shared_bf16proj"]
    for r in results.values():
        assert r["steps"] == 3 and math.isfinite(r["val_ppl"]) and r["val_ppl"] > 1
    assert results["after_lowrank_shared_bf16proj"]["config"]["projection_dtype"] == "gradient"
    text = out.with_suffix(".md").read_text()
    assert "| before_shared |" in text and "on 1 CPU thread(s)" in text
    assert payload["command"].startswith(f"DFA_DATA_DIR={wt2_root} python benchmarks/lm_operators.py")  # as run


def test_each_setting_that_changes_the_ids_has_its_own_cache_and_lowercase_applies_to_every_split(tmp_path):
    """A cache shared across `lowercase` (or BPE sizes) handed one setting's ids to the other without a word."""
    root = _tiny_wikitext(tmp_path, {"train": "The cat\n the Cat sat\n", "valid": "the Cat\n", "test": "sat\n"})
    kw = dict(root=str(root), cache_dir=str(tmp_path / "cache"), download=False, verify=False, streams=1)
    cased, lower = WikiTextDataModule(**kw), WikiTextDataModule(lowercase=True, **kw)
    cased.setup()
    lower.setup()
    assert cased.cache_path != lower.cache_path
    assert cased.vocab == ["The", "cat", "<eos>", "the", "Cat", "sat"]
    assert lower.vocab == ["the", "cat", "<eos>", "sat"]
    assert lower.ids["valid"].tolist() == [0, 1, 2] and lower.ids["test"].tolist() == [3, 2]
    files = cased.text_files()
    bpe = [WikiTextDataModule(tokenizer="bpe", vocab_size=v, **kw).cache_key(files) for v in (100, 200)]
    assert len({*bpe, cased.cache_key(files), lower.cache_key(files)}) == 4


def test_each_loader_reads_its_own_split(tmp_path):
    """Validation on valid.txt and test on test.txt (a test perplexity measured on valid.txt looks just as real)."""
    root = _tiny_wikitext(tmp_path, {"train": "a b c d e f\n", "valid": "a b\nc\n", "test": "d e f a b c d\n"})
    dm = WikiTextDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), download=False, verify=False,
                            streams=1, seq_len=100)
    dm.setup()
    for loader, split in ((dm.train_dataloader(), "train"), (dm.val_dataloader(), "valid"),
                          (dm.test_dataloader(), "test")):
        (x, y), = list(loader)
        assert torch.equal(torch.cat([x[0], y[0, -1:]]), dm.ids[split].long()), split


def test_a_download_failing_its_checksum_is_refused_and_a_bad_archive_in_the_cache_is_fetched_again(tmp_path,
                                                                                                  monkeypatch):
    """The archive is checked against its SHA-256 (nothing kept when it differs), and a file already at its place
    in the cache (an older partial download) is used only if it passes the same check."""
    served = tmp_path / "server" / "wikitext-2-v1.zip"  # a local stand-in for the official archive
    served.parent.mkdir()
    with zipfile.ZipFile(served, "w") as zf:
        for split in ("train", "valid", "test"):
            zf.writestr(f"wikitext-2/wiki.{split}.tokens", f" {split} text \n")
    archive = {**ARCHIVES["wikitext-2"], "urls": [served.as_uri()], "sha256": "0" * 64}
    monkeypatch.setitem(ARCHIVES, "wikitext-2", archive)
    (tmp_path / "empty").mkdir()
    kw = dict(root=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"), verify=False)
    with pytest.raises(DatasetError, match="checksum mismatch"):
        WikiTextDataModule(**kw).text_files()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
    (tmp_path / "cache" / "wikitext-2-v1.zip").write_bytes(b"the first bytes of an interrupted download")
    archive["sha256"] = hashlib.sha256(served.read_bytes()).hexdigest()
    files = WikiTextDataModule(**kw).text_files()
    assert files["valid"].read_text() == " valid text \n"


def test_a_cache_dir_that_cannot_be_written_is_named_as_the_setting_to_change(wt2_root, tmp_path):
    """A file in the way (or a read-only ~/.cache) gave a raw NotADirectoryError from the encoder's mkdir."""
    (tmp_path / "afile").write_text("x")
    dm = WikiTextDataModule(root=str(wt2_root), cache_dir=str(tmp_path / "afile"), download=False)
    with pytest.raises(DatasetError, match=rf"cannot write the wikitext-2 cache in {tmp_path / 'afile'}: .*; set "
                                           r"`cache_dir:` to a writable folder"):
        dm.setup()


def test_under_ddp_each_rank_scores_its_own_validation_chunks_none_twice(wt2, monkeypatch):
    """Lightning's own sampler pads the ranks' shares by repeating chunks; the DataModule hands each its own."""
    from helpers import shards

    one = [x for x, _ in wt2.val_dataloader()]
    rank0, rank1 = shards(monkeypatch, lambda: [x for x, _ in wt2.val_dataloader()])
    assert len(rank0) + len(rank1) == len(one) and len(rank0) - len(rank1) in (0, 1)
    assert all(torch.equal(a, b) for a, b in zip(one[0::2], rank0)) and all(
        torch.equal(a, b) for a, b in zip(one[1::2], rank1))


def test_under_ddp_an_integer_validation_limit_of_the_trainer_is_said_to_count_per_rank(wt2, monkeypatch):
    """The recipe's `limit_val_batches: 40` scores 80 chunks on 2 GPUs: the DataModule reads its Trainer's limit."""
    from types import SimpleNamespace

    from helpers import shards

    total = len(list(wt2.val_dataloader()))
    monkeypatch.setattr(wt2, "trainer", SimpleNamespace(limit_val_batches=3, limit_test_batches=1.0))
    with pytest.warns(UserWarning, match=f"limit_val_batches=3 acts on each rank's share of the {total} val batches: "
                                         "2 ranks score 6, one process 3"):
        shards(monkeypatch, lambda: list(wt2.val_dataloader()))
