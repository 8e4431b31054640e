"""CTR recipes on the real 10k-row Criteo sample: every model learns under BP, DFA and shallow, recipes read any
file of the Kaggle format (the default path included), and each recipe's header states the engine's split of
parameters correctly."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from dfa_lightning.cli import run

REPO = Path(__file__).resolve().parents[1]
SAMPLE_OVERRIDE = REPO / "recipes" / "sample" / "criteo_10k.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
MODELS = ["deepfm", "deepcross", "autoint", "afn"]
RECIPES = ["fm_bp"] + [f"{m}_{k}" for m in MODELS for k in ("bp", "dfa", "shallow")]
# Narrower layers keep the fast suite fast; names, depth and feedback points are those of the recipes.
SMALL = {
    "fm": [],
    "deepfm": ["--model.model.init_args.mlp_dims", "[64, 64, 64]"],
    "deepcross": ["--model.model.init_args.mlp_dims", "[128, 128]"],
    "autoint": ["--model.model.init_args.mlp_dims", "[64, 64, 64]"],
    "afn": ["--model.model.init_args.lnn_dim", "64", "--model.model.init_args.mlp_dims", "[64, 64, 64]"],
}


@pytest.fixture(scope="module")
def criteo(tmp_path_factory) -> dict[str, Path]:
    """A private copy of the real sample, once as a plain file and once as ``<root>/criteo/train.txt``."""
    from conftest import SHARED_DATA  # the shared_data fixture is function-scoped

    src = SHARED_DATA / "criteo" / "train_10k.txt"
    if not src.is_file():
        pytest.skip(f"Criteo sample not found at {src} (set DFA_DATA_DIR)")
    tmp = tmp_path_factory.mktemp("criteo")
    sample = tmp / "sample_copy.txt"
    shutil.copy(src, sample)
    (tmp / "root" / "criteo").mkdir(parents=True)
    shutil.copy(src, tmp / "root" / "criteo" / "train.txt")
    return {"sample": sample, "root": tmp / "root", "cache": tmp / "cache", "runs": tmp / "runs"}


def _fit(recipe: str, criteo: dict[str, Path], *extra: str, epochs: int = 3):
    out = criteo["runs"] / recipe
    return run(["fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"), "--config", str(SAMPLE_OVERRIDE),
                "--data.init_args.path", str(criteo["sample"]), "--data.init_args.cache_dir", str(criteo["cache"]),
                "--trainer.max_epochs", str(epochs), *QUIET, "--trainer.default_root_dir", str(out),
                "--trainer.logger.init_args.save_dir", str(out), *extra])


def _strategy(cli):
    return next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FeedbackAlignmentStrategy")


def _stated(recipe: str, label: str) -> set[str]:
    """Parameter names listed in the recipe header after ``# <label>:`` (continued on ``#   `` lines)."""
    text = (REPO / "recipes" / f"{recipe}.yaml").read_text()
    match = re.search(rf"^# {label}:(.*(?:\n#   .*)*)", text, re.M)
    assert match, f"{recipe}.yaml states no '{label}:' line"
    return set(re.findall(r"[a-z_]+(?:\.[a-z0-9_*]+)+", match.group(1)))


@pytest.mark.parametrize("recipe", RECIPES)
def test_ctr_recipe_learns_on_the_real_sample(recipe, criteo):
    """BP and DFA beat chance clearly on held-out rows; shallow trains only the output side (its AUC on 8,000
    rows is noisy, 0.48-0.71 in the sample table, so it is checked by which parameters receive gradients: one
    epoch shows them)."""
    model, method = recipe.split("_")
    cli = _fit(recipe, criteo, *SMALL[model], epochs=1 if method == "shallow" else 3 if model == "autoint" else 8)
    auroc, logloss = cli.test_results["test/auroc"], cli.test_results["test/logloss"]
    assert torch.isfinite(torch.tensor([auroc, logloss])).all()
    if method != "shallow":
        assert auroc > 0.60, cli.test_results  # chance is 0.5; full-size 8-epoch runs: 0.65-0.74
        return
    engine, params = _strategy(cli).engine, dict(cli.model.model.named_parameters())
    frozen = {n for p in engine.points for n in engine.segments.get(p.name, [])}
    state = cli.trainer.optimizers[0].state  # Adam moments exist, non-zero, only where gradients arrived
    moved = {n for n, p in params.items() if p in state and state[p]["exp_avg"].any()}
    assert frozen and moved == set(params) - frozen


@pytest.mark.parametrize("recipe", [f"{m}_dfa" for m in MODELS])
def test_dfa_recipe_header_names_the_parameters_trained_by_backprop_from_the_logit(recipe, criteo):
    model = recipe.split("_")[0]
    cli = _fit(recipe, criteo, *SMALL[model], "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches",
               "1", "--test_after_fit", "false", epochs=1)
    engine = _strategy(cli).engine
    below = {n for p in engine.points for n in engine.segments.get(p.name, [])}
    above = {n for n in engine.segments["__output__"] if n not in below}
    assert above == _stated(recipe, "Backprop from the logit")


def test_recipe_default_path_is_criteo_train_txt_under_the_data_root(criteo, tmp_path):
    out = tmp_path / "run"
    cli = run(["fit", "--config", str(REPO / "recipes" / "fm_bp.yaml"), "--config", str(SAMPLE_OVERRIDE),
               "--data.init_args.path", "null", "--data.init_args.root", str(criteo["root"]),
               "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1",
               "--trainer.limit_train_batches", "2", *QUIET, "--trainer.default_root_dir", str(out),
               "--trainer.logger.init_args.save_dir", str(out)])
    assert cli.datamodule.source_path() == criteo["root"] / "criteo" / "train.txt"
    assert cli.datamodule.meta["rows"] == 10_000 and "test/auroc" in cli.test_results


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_full_size_ctr_recipe_learns_on_the_real_sample(recipe, criteo):
    """The recipes' own widths, 8 epochs: what benchmarks/results/criteo_sample.md measures (AFN takes ~1 min)."""
    cli = _fit(recipe, criteo, epochs=8)
    auroc = cli.test_results["test/auroc"]
    assert auroc > 0.62 or (recipe.endswith("shallow") and torch.isfinite(torch.tensor(auroc))), cli.test_results


def test_a_ctr_checkpoint_can_be_tested_and_resumed(criteo, capsys):
    """The embedding is sized from the data at setup: the checkpoint check ran before that and called every CTR
    checkpoint foreign ("2 unexpected (model.embedding.weight; ...)"), refusing test, validate and resume."""
    from dfa_lightning.cli import main

    cli = _fit("deepfm_dfa", criteo, *SMALL["deepfm"], epochs=1)
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert ckpt
    common = ["--config", str(REPO / "recipes" / "deepfm_dfa.yaml"), "--config", str(SAMPLE_OVERRIDE),
              "--data.init_args.path", str(criteo["sample"]), "--data.init_args.cache_dir", str(criteo["cache"]),
              *SMALL["deepfm"], *QUIET, "--trainer.default_root_dir", str(criteo["runs"] / "again"),
              "--trainer.logger.init_args.save_dir", str(criteo["runs"] / "again")]
    assert main(["test", *common, "--ckpt_path", ckpt]) == 0
    assert main(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", ckpt]) == 0
    assert "does not fit" not in capsys.readouterr().err
    # a checkpoint of another model is still refused before the data is read
    assert main(["test", *common[:2], "--config", str(SAMPLE_OVERRIDE), "--data.init_args.path",
                 str(criteo["sample"]), "--data.init_args.cache_dir", str(criteo["cache"]), *QUIET,
                 "--model.model.init_args.embed_dim", "4", "--ckpt_path", ckpt]) == 2
    assert "does not fit this recipe's model (DeepFM)" in capsys.readouterr().err


def test_validation_off_under_early_stopping_is_refused_before_training(criteo, capsys):
    """It was a RuntimeError after the first epoch: every CTR recipe stops early on val/auroc."""
    from dfa_lightning.cli import main

    argv = ["fit", "--config", str(REPO / "recipes" / "deepfm_bp.yaml"), "--config", str(SAMPLE_OVERRIDE),
            "--data.init_args.path", str(criteo["sample"]), "--data.init_args.cache_dir", str(criteo["cache"]),
            *QUIET, "--trainer.default_root_dir", str(criteo["runs"] / "noval"),
            "--trainer.logger.init_args.save_dir", str(criteo["runs"] / "noval"), "--trainer.limit_val_batches", "0"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "trainer.limit_val_batches is 0: validation is off, but EarlyStopping monitors " \
                              "val/auroc" in err[0]


@pytest.mark.parametrize("extra, refused", [
    (["--trainer.max_steps", "2"], True),
    (["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"], False),
    (["--trainer.max_steps", "16", "--trainer.accumulate_grad_batches", "2"], False),
], ids=["before the first validation", "validating sooner", "accumulated to the epoch"])
def test_max_steps_ending_before_the_first_validation_under_early_stopping_is_refused(criteo, capsys, extra, refused):
    """`--trainer.max_steps 2` on a CTR recipe trained, then EarlyStopping's RuntimeError: no val/auroc to read."""
    from dfa_lightning.cli import main

    runs = criteo["runs"] / f"steps{len(extra)}"
    argv = ["fit", "--config", str(REPO / "recipes" / "deepfm_bp.yaml"), "--config", str(SAMPLE_OVERRIDE),
            "--data.init_args.path", str(criteo["sample"]), "--data.init_args.cache_dir", str(criteo["cache"]),
            *QUIET, "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs), *extra]
    assert main(argv) == (2 if refused else 0)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    if refused:
        assert len(err) == 1 and "trainer.max_steps is 2: the run ends before its first validation (after 32 " \
                                  "training batches), but EarlyStopping monitors val/auroc" in err[0], err
        assert not runs.exists() or not any(runs.rglob("*.ckpt"))
