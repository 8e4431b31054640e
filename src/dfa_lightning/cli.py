"""Command line: ``python -m dfa_lightning {fit,validate,test,predict} --config RECIPE.yaml``.

A LightningCLI whose model is always :class:`~dfa_lightning.module.TaskModule` and whose data is any
LightningDataModule (``class_path``/``init_args``). After ``fit`` it tests the best checkpoint (the paper's "test
accuracy at the best validation accuracy") unless ``--test_after_fit false``. Errors a user can fix are printed as
one line naming the file, key or module, without a traceback.
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from dfa_lightning.errors import ConfigError, UserError
from dfa_lightning.module import TaskModule


class RecipeArgumentParser(LightningArgumentParser):
    """Turn jsonargparse's usage wall into one :class:`ConfigError` line naming the recipe and the key."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start_dir = Path.cwd()  # jsonargparse enters a recipe's folder while parsing it: paths are relative here

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if not self.exit_on_error:  # an inner, tentative parse: jsonargparse catches this one itself
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise ConfigError(_explain(message, parser))


def _explain(message: str, parser: LightningArgumentParser) -> str:
    """One line: the recipe, the offending key, and a close match or the parser's reason."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()] or [message]
    argv = list(getattr(parser, "args", None) or sys.argv)
    recipes = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    where = f"{', '.join(recipes)}: " if recipes else ""
    start = getattr(parser, "start_dir", None) or Path.cwd()
    missing = [r for r in recipes if r.endswith((".yaml", ".yml")) and not (start / r).is_file()]
    if missing:
        return f"{', '.join(missing)}: recipe file not found (from {start})"
    top = re.search(r"does not accept (?:option|nested key) '([^']+)'", lines[0])
    if top:
        key = top.group(1)
        known = [o.lstrip("-") for o in parser._option_string_actions if o.startswith("--")]
        hint = difflib.get_close_matches(key, known, n=1)
        return f"{where}unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    nested = re.match(r'Parser key "([^"]+)":', lines[0])
    if nested:
        key = nested.group(1)
        inner = re.search(r"(?:Option|Key) '([^']+)' is not accepted|does not accept nested key '([^']+)'", message)
        cls = re.search(r"class_path '([^']+)'", message)
        if inner:
            name = inner.group(1) or inner.group(2)
            owner = f" ({cls.group(1)} has no argument '{name}')" if cls else ""
            return f"{where}unknown key '{key}.init_args.{name}'{owner}"
        return f"{where}invalid value for '{key}': {'; '.join(lines[1:4])}"
    return f"{where}{'; '.join(lines[:4])}"


class DFALightningCLI(LightningCLI):
    test_results: dict[str, float] = {}


    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, test the best checkpoint (or the last weights without checkpointing)")

    def before_instantiate_classes(self) -> None:
        """Name the TensorBoard run after the recipe, the first ``--config`` (logs/<recipe>/version_N; an override
        such as ``recipes/sample/*.yaml`` after it does not rename it), unless the recipe names it."""
        config = self.config.get(self.subcommand, self.config)
        callbacks = config.get("trainer", {}).get("callbacks") or []
        rules = [c for c in callbacks if str(getattr(c, "class_path", "")).endswith("FeedbackAlignmentStrategy")]
        if len(rules) > 1:  # allowed only as one rule over several networks: distinct names, one method
            args = [getattr(c, "init_args", None) for c in rules]
            names = [getattr(a, "name", None) for a in args]
            methods = {getattr(a, "method", "dfa") for a in args}
            if None in names or len(set(names)) < len(names) or len(methods) > 1:
                raise ConfigError(f"{len(rules)} FeedbackAlignmentStrategy entries in trainer.callbacks: a run has one "
                                  "learning rule (bp, dfa or shallow); remove the extra one (several are allowed "
                                  "only with the same method and a distinct `name` each, one per network, as "
                                  "recipes/nerf_dfa.yaml)")
        logger = config.get("trainer", {}).get("logger")
        paths = config.get("config") or []
        if paths and isinstance(logger, dict) is False and getattr(logger, "init_args", None) is not None:
            if getattr(logger.init_args, "name", None) in (None, "default", "lightning_logs"):
                logger.init_args.name = Path(str(paths[0])).stem  # the recipe; later configs are overrides

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        datamodule = self.datamodule
        has_test = datamodule is not None and type(datamodule).test_dataloader is not pl.LightningDataModule.test_dataloader
        if not has_test or self.trainer.fast_dev_run:
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
        results = self.trainer.test(self.model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        self.test_results = results[0] if results else {}
        if self.trainer.is_global_zero and results:
            summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(results[0].items()))
            where = f"best checkpoint {checkpoint.best_model_path}" if ckpt_path else "final weights"
            print(f"TEST ({where}): {summary}", flush=True)


def trainer_defaults() -> dict:
    return {
        "logger": {
            "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "logs", "name": "default", "default_hp_metric": False},
        },
    }


def run(args: list[str] | None = None, run: bool = True) -> DFALightningCLI:
    """Build the CLI (``run=False``: parse and instantiate only, no subcommand, as the recipe test does)."""
    return DFALightningCLI(
        TaskModule,
        pl.LightningDataModule,
        parser_class=RecipeArgumentParser,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[own args] -- [CLI args for every run]`` -> (own, passthrough), for the tools that launch runs (sweep,
    graphs_reproduce, placements)."""
    if "--" not in argv:
        return list(argv), []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def main(args: list[str] | None = None) -> int:
    try:
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

