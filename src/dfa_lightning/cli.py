"""Command line: ``python -m dfa_lightning {fit,validate,test,predict} --config RECIPE.yaml``.

A LightningCLI whose model is always :class:`~dfa_lightning.module.TaskModule` and whose data is any
LightningDataModule (``class_path``/``init_args``). After ``fit`` it tests the best checkpoint (the paper's "test
accuracy at the best validation accuracy") unless ``--test_after_fit false``. Errors a user can fix are printed as
one line naming the file, key or module, without a traceback.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from jsonargparse import set_loader
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_warn

from dfa_lightning.checkpoint_check import checkpoint_problem, read_checkpoint
from dfa_lightning.model_args import learning_rate_problem, model_arg_problem, null_arg_problem
from dfa_lightning.errors import ConfigError, UserError
from dfa_lightning.module import TaskModule, validation_interval
from dfa_lightning.probe import first_batch


def _strict_yaml_loader() -> type:
    """jsonargparse's YAML loader, refusing a key given twice in one mapping: YAML keeps the last one silently, and
    a second ``trainer:`` block would drop the first one's callbacks (the DFA rule with them) without a word."""
    from jsonargparse._loaders_dumpers import get_yaml_default_loader

    class StrictLoader(get_yaml_default_loader()):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        if key in first:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"key {key!r} given twice (first on line {first[key] + 1}); YAML would "
                                "keep only the last one", key_node.start_mark)
                        first[key] = key_node.start_mark.line
                    except TypeError:  # an unhashable key: nothing to compare
                        continue
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def strict_yaml_load(stream: str):
    """The ``yaml`` mode's loader with :func:`_strict_yaml_loader`'s duplicate-key check, else jsonargparse's."""
    from jsonargparse._loaders_dumpers import yaml_load

    yaml.load(stream, Loader=_STRICT_LOADER)  # raises on a duplicate key, with its line
    return yaml_load(stream)


_STRICT_LOADER = _strict_yaml_loader()
set_loader("yaml", strict_yaml_load, exceptions=(yaml.YAMLError,))


class RecipeArgumentParser(LightningArgumentParser):
    """Turn jsonargparse's usage wall into one :class:`ConfigError` line naming the recipe and the key."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_epoch` must not pass for `max_epochs` unsaid
        super().__init__(*args, **kwargs)
        self.start_dir = Path.cwd()  # jsonargparse enters a recipe's folder while parsing it: paths are relative here

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if not self.exit_on_error:  # an inner, tentative parse: jsonargparse catches this one itself
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise ConfigError(_explain(message, parser))


def split_config_flags(argv: list[str]) -> list[str]:
    """``--config=FILE`` as ``--config FILE``: jsonargparse takes both, and every check here reads the spaced form
    (an override typed before ``--config=FILE`` was not refused, an error did not name the recipe)."""
    return [part for a in argv for part in (a.split("=", 1) if a.startswith("--config=") else [a])]


def _recipes(argv: list[str]) -> list[str]:
    argv = split_config_flags(argv)
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]


def _override_before_recipe(argv: list[str]) -> str | None:
    """A ``--key`` typed before a ``--config`` that sets the same key: arguments apply in order, so the recipe's
    value would silently win (``--trainer.max_epochs 2 --config r.yaml`` trains the recipe's 250 epochs)."""
    argv = split_config_flags(argv)
    configs = [(i, argv[i + 1]) for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg in ("--config", "--print_config", "--help"):
            continue
        key = arg[2:].split("=", 1)[0].rstrip("+")
        for j, recipe in configs:
            if j > i and any(k == key or k.startswith(f"{key}.") or key.startswith(f"{k}.")
                             for k in _recipe_keys(recipe)):
                return (f"command line: --{key} comes before --config {recipe}, which sets it again (later arguments "
                        "win); put overrides after the --config they change")
    return None


def _recipe_keys(recipe: str) -> list[str]:
    """The dotted keys a recipe file sets (none when it cannot be read: the parser names that)."""
    try:
        tree = yaml.safe_load(Path(recipe).read_text())
    except (OSError, yaml.YAMLError):
        return []
    keys: list[str] = []

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif prefix:
            keys.append(prefix[:-1])

    walk(tree, "")
    return keys


def _recipe_file_problem(recipe: str, start: Path) -> str | None:
    """Why a ``--config`` value is not a recipe file: not there (with the file it probably meant), a folder, or
    empty. A value that looks like inline YAML is left to the parser."""
    if recipe.lstrip().startswith("{") or "\n" in recipe or ": " in recipe:
        return None
    path = start / recipe
    if path.is_dir():
        return f"is a folder, not a recipe file (from {start})"
    if not path.is_file():
        stem = Path(recipe).name
        guesses = [c for c in (f"{recipe}.yaml", f"recipes/{stem}.yaml", f"recipes/{stem}") if (start / c).is_file()]
        hint = f" (did you mean {guesses[0]}?)" if guesses else ""
        return f"recipe file not found (from {start}){hint}"
    problem = _yaml_problem(path)
    if problem:
        return problem
    if not yaml.safe_load(path.read_text() or "null"):
        return "the recipe is empty"
    return None


def _yaml_problem(path: Path) -> str | None:
    """Where a YAML file does not parse (a bracket left open, a tab in the indent), with the parser's reason."""
    try:
        yaml.safe_load(path.read_text() or "null")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return f"{where}not valid YAML ({getattr(err, 'problem', None) or err})"
    return None


def _origin(argv: list[str], key: str, plain: bool = False) -> str:
    """Where ``key`` was set, as a message prefix: the recipe(s), or the command line when it was typed there (named
    beside the recipe it overrides); ``plain``: only the command line, else ""."""
    recipes = _recipes(argv)
    flags = [a.split("=", 1)[0].rstrip("+") for a in split_config_flags(argv)  # `--trainer.callbacks+=x`: appends
             if a.startswith("--") and a not in ("--config", "--print_config")]
    if any(f.lstrip("-") == key or f.startswith(f"--{key}.") for f in flags):
        return f"command line ({', '.join(recipes)}): " if recipes else "command line: "
    return "" if plain else f"{', '.join(recipes)}: " if recipes else ""


def _explain(message: str, parser: LightningArgumentParser) -> str:
    """One line: the recipe, the offending key, and a close match or the parser's reason."""
    message = re.sub(r'in "<unicode string>", line (\d+), column \d+', r"line \1", message)
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()] or [message]
    argv = list(getattr(parser, "args", None) or sys.argv)
    recipes = _recipes(argv)
    where = f"{', '.join(recipes)}: " if recipes else ""
    start = getattr(parser, "start_dir", None) or Path.cwd()
    for recipe in recipes:
        problem = _recipe_file_problem(recipe, start)
        if problem:
            return f"{recipe}: {problem}"

    def source(key: str) -> str:  # `--trainer.callbacks.seed` is typed without the `init_args` level
        return _origin(argv, key.replace(".init_args.", "."), plain=True) or _origin(argv, key)

    known = [o.lstrip("-") for o in parser._option_string_actions if o.startswith("--")]
    unrecognised = re.match(r"unrecognized arguments: (--\S+)", lines[0])
    if unrecognised:
        key = unrecognised.group(1).split("=", 1)[0].lstrip("-")
        hint = difflib.get_close_matches(key, known, n=1)
        return f"{source(key)}unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    top = re.search(r"does not accept (?:option|nested key) '([^']+)'", lines[0])
    if top:
        key = top.group(1)
        hint = difflib.get_close_matches(key, known, n=1)
        return f"{source(key)}unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    nested = re.match(r'Parser key "([^"]+)":', lines[0])
    if nested:
        key = nested.group(1)
        inner = re.search(r"(?:Option|Key) '([^']+)' is not accepted|does not accept nested key '([^']+)'", message)
        cls = re.search(r"class_path '([^']+)'", message)
        if inner:
            name = inner.group(1) or inner.group(2)
            full = f"{key}.init_args.{name}"
            wrong = _wrong_type(message, name)
            if wrong:  # the class takes it; its value has the wrong type (the "not accepted" is the base class's)
                return f"{source(full)}invalid value for '{full}': {wrong}"
            owner = f" ({cls.group(1)} has no argument '{name}')" if cls else ""
            if cls and cls.group(1).rsplit(".", 1)[-1] in _BASE_CLASSES:
                owner += ("; no class is set for it yet where this file is read: give the recipe before an overlay "
                          "(--config recipe.yaml --config overlay.yaml)")
            return f"{source(full)}unknown key '{full}'{owner}"
        inner_key, reason = _union_reason(message)
        if reason:
            return f"{source(key)}invalid value for '{key}{inner_key}': {reason}"
        return f"{source(key)}invalid value for '{key}': {'; '.join(lines[1:4])}"
    return f"{where}{'; '.join(lines[:4])}"


def _wrong_type(message: str, name: str | None = None) -> str | None:
    """The innermost ``Parser key "k": ... Subtypes: [...] ... Given value: v`` block (of key ``name`` when given)
    as "expected <types>, got <value>": a setting of the right name with a value of the wrong type (one
    ``feedback_points: hidden`` without brackets), which jsonargparse reports beside a false "not accepted"."""
    pattern = re.escape(name) if name else '[^"]+'
    block = re.compile(rf'Parser key "{pattern}":[ \t]*\n((?:.*\n)+?)[ \t]*Given value: (.+)')
    starts = [m.start() for m in re.finditer('Parser key "', message)]  # blocks nest: match at every start
    blocks = [b for b in (block.match(message, i) for i in starts) if b]
    inner = [b for b in blocks if 'Parser key "' not in b.group(1)]
    if not inner:
        return None
    body, value = inner[-1].group(1), inner[-1].group(2).split(". Got value:")[0].strip()
    subtypes = re.search(r"Subtypes: \[(.+)\]", body)
    expected = re.findall(r"Expected a <class '([\w.]+)'>", body)
    wanted = (re.sub(r"<class '([\w.]+)'>", r"\1", subtypes.group(1).replace("<class 'NoneType'>", "null"))
              .replace(", ", " or ") if subtypes else " or ".join(expected))
    return f"expected {wanted}, got {value!r}" if wanted else None


_BASE_CLASSES = ("LightningDataModule", "Callback", "Module", "LightningModule")
_GENERIC = ("Expected a <class 'NoneType'>", "a class path (str)", "a dict ", "Subclass types expect one of")


def _close_fragment(named: str) -> str | None:
    """A YAML file next to where ``named`` points, close to its name (``callbacks/alignmnt.yaml``), looked for from
    the working folder and from its ``recipes/`` (where a recipe's ``../callbacks/...`` starts)."""
    path = Path(named)
    for base in (Path.cwd(), Path.cwd() / "recipes"):
        folder = base / path.parent
        if folder.is_dir():
            hit = difflib.get_close_matches(path.name, [p.name for p in folder.glob("*.y*ml")], n=1)
            if hit:
                return str(path.parent / hit[0])
    return None


def _class_not_found(path: str) -> str | None:
    """"class '<path>' not found (did you mean ...?)" when ``path`` names a module's missing attribute, else None."""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 (not a module path: not this kind of mistake)
        return None
    if hasattr(module, attr):
        return None
    hint = difflib.get_close_matches(attr, dir(module), n=1)
    return f"class '{path}' not found" + (f" (did you mean '{module_name}.{hint[0]}'?)" if hint else "")


def _union_reason(message: str) -> tuple[str, str | None]:
    """jsonargparse's "does not validate against any of the Union subtypes" wall -> (the inner key, if the value
    is a class's ``init_args``, and the first specific reason): a class that is not found (with a close match), a
    fragment file that is not there, an entry with keys other than ``class_path``/``init_args``, a value outside a
    ``Literal``."""
    inner = re.findall(r'Parser key "([^"]+)":', message)[1:]
    within_class = "Problem with given class_path" in message or "expects a function or a callable class" in message
    inner_key = f".init_args.{inner[-1]}" if inner and within_class else ""
    for named in dict.fromkeys(re.findall(r"[\w./~-]+\.ya?ml\b", message)):  # a fragment that is not valid YAML
        problem = _yaml_problem(Path(named)) if Path(named).is_file() else None
        if problem:
            return inner_key, f"fragment {named}: {problem}"
    missing = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message)
    if missing and "has no attribute" in missing.group(2):
        return inner_key, _class_not_found(missing.group(1)) or f"class '{missing.group(1)}' not found"
    if missing and "No module named" in missing.group(2):
        return inner_key, f"class '{missing.group(1)}' not found ({missing.group(2).strip()})"
    fragment = re.search(r"Unexpected import path format: (\S+)", message)
    if fragment:
        hint = _close_fragment(fragment.group(1))
        return inner_key, (f"'{fragment.group(1)}' is neither a class path nor an existing file (a fragment named in "
                           f"a recipe is found from the recipe's folder, one typed on the command line from "
                           f"{Path.cwd()})" + (f"; did you mean '{hint}'?" if hint else ""))
    entry = re.search(r"Not a valid subclass of \w+\. Got value: (\{.*\})", message)
    if entry:
        try:
            keys = [k for k in ast.literal_eval(entry.group(1)) if k not in ("class_path", "init_args", "dict_kwargs")]
        except (ValueError, SyntaxError):
            keys = []
        if keys:
            return inner_key, (f"unexpected key(s) {keys} in a class_path/init_args entry (a misspelt class_path, "
                               "or a setting that belongs under init_args?)")
    literals = re.findall(r"Expected a typing\.Literal\[(.+)\]", message)
    if literals:  # a Union of Literals (trainer.precision: 64, 32, 16, 'bf16-mixed', ...): every choice
        return inner_key, f"expected one of {', '.join(dict.fromkeys(literals))}"
    given = re.search(r"(?:Given|Got) value: ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\s*$", message, flags=re.M)
    if given:  # a class path that does not import (a Callable-typed key: `lr_scheduler: ...StepLRR`)
        found = _class_not_found(given.group(1))
        if found:
            return inner_key, found
    wrong = _wrong_type(message)
    if wrong:
        return inner_key, wrong
    bullets = [b.strip() for b in re.findall(r"^\s*- (.+)$", message, flags=re.M)]
    specific = [b for b in bullets if not b.startswith(_GENERIC) and not b.startswith("Not a valid subclass")]
    return inner_key, (specific[0] if specific else None)


class DFALightningCLI(LightningCLI):
    test_results: dict[str, float]  # after fit: the test metrics of the best checkpoint (set in after_fit)

    def __init__(self, *args, **kwargs) -> None:
        self.test_results = {}  # before LightningCLI runs the subcommand (which may fill it)
        self._saved_state: dict | None = None  # ckpt_path's state_dict, read once while parsing
        self._saved_step: int | None = None  # ckpt_path's global step: a resumed fit that takes none is refused
        given = kwargs.get("args")
        self._argv = [str(a) for a in given] if isinstance(given, (list, tuple)) else sys.argv[1:]
        problem = _override_before_recipe(self._argv)
        if problem:
            raise ConfigError(problem)
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``ckpt_path`` for saved hyperparameters right after parsing: a truncated or foreign
        file is named here, as one line, instead of torch's unpickling traceback."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(str(ckpt_path)).is_file():
            try:
                checkpoint = read_checkpoint(str(ckpt_path))  # memory-mapped; checked against the model later
                self._saved_state, self._saved_step = checkpoint["state_dict"], checkpoint.get("global_step")
            except ValueError as err:
                raise ConfigError(f"ckpt_path {ckpt_path}: {err}") from None
        super()._parse_ckpt_path()

    def _set_seed(self) -> None:
        """A seed outside numpy's range (Lightning seeds numpy too) is named, not a ValueError traceback."""
        seed = self._get(self.config, "seed_everything")
        if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed <= 2**32 - 1:
            raise ConfigError(f"{_origin(self._argv, 'seed_everything')}seed_everything is {seed}: expected an "
                              f"integer from 0 to {2**32 - 1}, or true (a random one) or false (none)")
        super()._set_seed()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, test the best checkpoint (or the last weights without checkpointing)")

    def before_instantiate_classes(self) -> None:
        """Name the TensorBoard run after the recipe, the first ``--config`` (logs/<recipe>/version_N; an override
        such as ``recipes/sample/*.yaml`` after it does not rename it), unless the recipe names it."""
        config = self.config.get(self.subcommand, self.config)
        ckpt_path = config.get("ckpt_path")
        if self.subcommand in ("validate", "test", "predict"):
            ckpt_path = self._evaluated_checkpoint(config, ckpt_path)
        if self.subcommand == "fit" and str(ckpt_path) == "last":
            raise ConfigError("ckpt_path 'last' on fit: every run logs to a new version folder, so Lightning finds no "
                              "last checkpoint there and trains from scratch; give the file to resume "
                              "(logs/<recipe>/version_N/checkpoints/last.ckpt)")
        path = Path(str(ckpt_path))
        if (ckpt_path and str(ckpt_path) not in ("best", "last", "hpc", "registry") and "://" not in str(ckpt_path)
                and not path.is_file()):  # before any model or data is built: nothing to lose
            if path.is_dir():
                inside = ", ".join(sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))) or "none"
                raise ConfigError(f"ckpt_path {ckpt_path}: a folder, not a checkpoint file (its checkpoints: {inside})")
            raise ConfigError(f"ckpt_path {ckpt_path}: checkpoint file not found (from {Path.cwd()})")
        self._check_trainer_counts(config.get("trainer", {}))
        self._check_model_args(config)
        callbacks = config.get("trainer", {}).get("callbacks") or []
        if not isinstance(callbacks, list):  # `--trainer.callbacks callbacks/x.yaml`: one callback, not a list
            callbacks = [callbacks]
        rules = [c for c in callbacks if str(getattr(c, "class_path", "")).endswith("FeedbackAlignmentStrategy")]
        if not rules and self.subcommand == "fit" and any(a == "--trainer.callbacks" or a.startswith(
                "--trainer.callbacks=") for a in self._argv):
            raise ConfigError("--trainer.callbacks replaces the recipe's whole callbacks list, and the new one has no "
                              "FeedbackAlignmentStrategy: the run would train by plain backprop under the recipe's "
                              "name; add a callback with --trainer.callbacks+=<class or file>, or list the rule too "
                              "(callbacks/dfa.yaml, or callbacks/bp.yaml for backprop)")
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

    def _check_model_args(self, config) -> None:
        """A size below 1 or a dropout outside [0, 1] in ``model.model.init_args``, a ``null`` where the optimizer or
        the scheduler takes a value, and a learning rate of 0 that trains nothing, named before anything is built
        (see :mod:`dfa_lightning.model_args`)."""
        model = config.get("model")
        for part, check in (("model", model_arg_problem), ("optimizer", null_arg_problem),
                            ("lr_scheduler", null_arg_problem)):
            node = getattr(model, part, None)
            class_path, init_args = getattr(node, "class_path", None), getattr(node, "init_args", None)
            problem = check(str(class_path), dict(vars(init_args))) if class_path and init_args is not None else None
            if problem:
                key = f"model.{part}.init_args.{problem.split()[0]}"
                raise ConfigError(f"{_origin(self._argv, key)}model.{part}.init_args.{problem}")
        if self.subcommand == "fit":
            optimizer_args = getattr(getattr(model, "optimizer", None), "init_args", None)
            scheduler_args = getattr(getattr(model, "lr_scheduler", None), "init_args", None)
            problem = learning_rate_problem(getattr(optimizer_args, "lr", None),
                                            dict(vars(scheduler_args)) if scheduler_args is not None else {},
                                            [dict(g) for g in (getattr(model, "param_groups", None) or [])])
            if problem:
                raise ConfigError(f"{_origin(self._argv, 'model.optimizer.init_args.lr')}model.optimizer.init_args."
                                  f"{problem}")

    def _evaluated_checkpoint(self, config, ckpt_path):
        """``validate``/``test``/``predict`` score the weights of ``ckpt_path``: without one they would score the
        untrained initial weights, as a normal-looking table (``init`` says so on purpose); ``best``/``last`` name
        a checkpoint of a fit in the same command, which a separate evaluation has not got."""
        if ckpt_path is None:
            raise ConfigError(f"{self.subcommand} without --ckpt_path would score the untrained initial weights; give a "
                              "run's checkpoint (--ckpt_path logs/<recipe>/version_N/checkpoints/<file>.ckpt; fit "
                              "tests its best checkpoint itself), or --ckpt_path init to score the initial weights")
        if str(ckpt_path) == "init":
            config.ckpt_path = None
            return None
        if str(ckpt_path) in ("best", "last"):
            raise ConfigError(f"ckpt_path {ckpt_path!r} is the {ckpt_path} checkpoint of a fit in the same command; a "
                              f"separate `{self.subcommand}` has none: give the file "
                              "(logs/<recipe>/version_N/checkpoints/<file>.ckpt)")
        return ckpt_path

    def _check_trainer_counts(self, trainer: dict) -> None:
        """Counts Lightning takes modulo without checking them: 0 is a ZeroDivisionError mid-run; and a ``fit``
        bounded to no training step, which tested the untrained weights as if they were a result."""
        if self.subcommand == "fit":
            for key in ("max_epochs", "max_steps", "limit_train_batches"):
                if trainer.get(key) == 0:
                    where = _origin(self._argv, f"trainer.{key}")
                    raise ConfigError(f"{where}trainer.{key} is 0: fit would take no training step and test the "
                                      "untrained weights; to score those, run `test --ckpt_path init`")
        for key, allowed, valid in (
                ("accumulate_grad_batches", "an integer >= 1", lambda v: v >= 1),
                ("check_val_every_n_epoch", "an integer >= 1, or null to validate by steps",
                 lambda v: v is None or v >= 1),
                ("val_check_interval", "a fraction of an epoch in (0, 1] or a number of batches >= 1 (to turn "
                 "validation off, set trainer.limit_val_batches: 0)",
                 lambda v: v is None or not isinstance(v, (int, float)) or v > 0)):  # or a time: "00:01:00:00"
            value = trainer.get(key)
            if key in trainer and not valid(value):
                where = _origin(self._argv, f"trainer.{key}")
                raise ConfigError(f"{where}trainer.{key} is {value}: expected {allowed}")

    def _check_data_fits_model(self) -> None:
        """``in_channels`` and ``out_channels`` in the recipe against the data's feature and class counts
        (``model_hints``), before a step: a mismatch (Cora is 1433 features and 7 classes, PubMed 500 and 3) is
        otherwise a matmul shape error, or an IndexError in the loss, deep in the first step."""
        hints = getattr(self.datamodule, "model_hints", None)
        config = self.config.get(self.subcommand, self.config)
        init_args = getattr(config.get("model", {}).get("model"), "init_args", None)
        if init_args is None or not callable(hints):
            return
        for key, what in (("in_channels", "features"), ("out_channels", "classes")):
            given = getattr(init_args, key, None)
            if given is None or (key == "out_channels" and getattr(self.datamodule, "link_split", False)):
                continue  # a link-prediction encoder's out_channels is its embedding width, not the classes
            expected = hints().get(key)
            if expected is not None and int(given) != int(expected):
                raise ConfigError(f"model.model.init_args.{key} is {given}, but the data has {expected} {what} "
                                  f"({type(self.datamodule).__name__}); set it to {expected}")

    def _check_checkpoint_fits_model(self) -> None:
        """A truncated ``ckpt_path``, or one written by another recipe, named before the data is set up (it was a
        torch unpickling or ``load_state_dict`` traceback)."""
        ckpt_path = self.config.get(self.subcommand, self.config).get("ckpt_path")
        if ckpt_path and Path(str(ckpt_path)).is_file():  # not "best"/"last"/a URL: Lightning resolves those
            problem = checkpoint_problem(str(ckpt_path), self.model, self._saved_state)
            self._saved_state = None  # Lightning reads the file itself to restore it
            if problem:
                raise ConfigError(problem)

    def instantiate_classes(self) -> None:
        """A class's own refusal of an argument (a DataModule's ``name: Coraa``, a rule's ``operator: denze``) named
        the class and the value but not where they were set: said here with the recipe (or the command line) and
        the class's key in the config."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = user_error(err)
            located = self._located(cause) if cause is not None else None
            if located is None:
                raise
            raise type(cause)(located) from err

    def _located(self, cause: BaseException) -> str | None:
        """``cause``'s message as "<where><key> (<Class>): <reason>", or None when its class is not in the config."""
        message = str(cause)
        named = re.match(r"(\w+)(\s'[^']*')?: ", message)
        if named is None:
            return None
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        keys = _class_keys(config.as_dict() if hasattr(config, "as_dict") else dict(config), named.group(1))
        if len(keys) != 1:  # not there, or several: the class name alone is the clearer message
            return None
        return f"{_origin(self._argv, keys[0])}{keys[0]} ({named.group(0)[:-2]}): {message[named.end():]}"

    def _run_subcommand(self, subcommand: str) -> None:
        """A refusal raised once the run has begun (a feedback point that matches nothing, a resumed checkpoint of
        another rule, an optimizer setting) left a run folder holding only the config and an empty event file,
        which TensorBoard lists as a run: removed, when this fit made it and trained no step."""
        fresh = self._new_run_folder() if subcommand == "fit" else None
        try:
            super()._run_subcommand(subcommand)
        except Exception as err:
            cause = user_error(err)
            refused = cause is not None or lightning_refusal(err, self._argv) is not None  # Lightning's own too:
            untrained = self.trainer.global_step in (0, self._first_step())  # `val_check_interval` past the epoch
            if fresh is not None and refused and untrained:
                remove_untrained_run_folder(fresh)
            if cause is not None and cause.key is not None:  # the setting is named; where it was set is said here
                raise type(cause)(f"{_origin(self._argv, cause.key)}{cause}") from err
            raise

    def _new_run_folder(self) -> Path | None:
        """The logger's version folder when this process makes it (rank 0, a folder not there yet)."""
        from pytorch_lightning.utilities.rank_zero import rank_zero_only

        logger = self.trainer.logger
        if rank_zero_only.rank != 0 or logger is None or getattr(logger, "log_dir", None) is None:
            return None
        folder = Path(logger.log_dir)
        return None if folder.exists() else folder

    def _first_step(self) -> int:
        """The step this fit started from: a resumed fit's checkpoint step once restored, else 0."""
        return self._saved_step if self._saved_step is not None else 0

    def before_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config  # run=False
        if config.get("test_after_fit", True) and hasattr(self.datamodule, "check_test_split"):
            self.datamodule.check_test_split()  # the data's own check, before the training the test would end
        self._check_checkpoint_fits_model()  # first: the data's hints may set it up
        self._check_data_fits_model()
        self._check_validation_feeds_early_stopping()
        self._check_step_memory()
        for callback in self.trainer.callbacks:  # before DDP launches its processes: one message, not one a rank
            if callable(getattr(callback, "check_strategy", None)):
                callback.check_strategy(self.trainer)

    def _check_step_memory(self) -> None:
        """The model's step-memory check (NeRF's rays per batch) before DDP launches its processes: one message,
        not one a rank. Its first batch is drawn with the random state forked (see ``first_batch``): the run is
        unchanged."""
        task = getattr(self.model, "task", None)
        if self.datamodule is None or not callable(getattr(task, "check_step_memory", None)):
            return  # a batch is drawn only for a task that checks
        batch = first_batch(self.datamodule.train_dataloader())
        if batch is not None:
            self.model.check_step_memory(self.trainer, batch)

    def _check_validation_feeds_early_stopping(self) -> None:
        """EarlyStopping on a ``val/`` metric with validation off, or with ``max_steps`` ending the run before the
        first validation, raised a RuntimeError once training stopped (the CTR recipes all stop early on
        ``val/auroc``; ``--trainer.max_steps 2`` on one of them was enough); a ``val/`` checkpoint monitor falls back
        to the final weights, which the TEST line says, so only early stopping is refused. A ReduceLROnPlateau
        stepped at each epoch's end (every LM recipe) needs a validation in every epoch: without one, Lightning
        stopped the run after its first whole epoch of training, with no checkpoint."""
        self._check_validation_feeds_the_plateau_scheduler()
        stoppers = [cb.monitor for cb in self.trainer.callbacks
                    if isinstance(cb, pl.callbacks.EarlyStopping) and str(cb.monitor).startswith("val")]
        if not stoppers:
            return
        if validation_interval(self.trainer) is None:  # Lightning 2.6's EarlyStopping reads the unset attribute
            where = _origin(self._argv, "trainer.val_check_interval")
            raise ConfigError(f"{where}trainer.val_check_interval is a time: Lightning's EarlyStopping (monitoring "
                              f"{stoppers[0]}) fails with validation on the clock (AttributeError in its setup); "
                              "give a fraction of an epoch or a number of batches")
        if self.trainer.limit_val_batches == 0:
            where = _origin(self._argv, "trainer.limit_val_batches")
            raise ConfigError(f"{where}trainer.limit_val_batches is 0: validation is off, but EarlyStopping "
                              f"monitors {stoppers[0]}, which validation logs; keep validation on, or leave the "
                              "early-stopping callback out of the recipe")
        max_steps, accumulate = self.trainer.max_steps, self.trainer.accumulate_grad_batches
        if max_steps in (None, -1):
            return
        first = self._batches_before_first_validation()
        if first is not None and max_steps * accumulate < first:
            where = _origin(self._argv, "trainer.max_steps")
            raise ConfigError(f"{where}trainer.max_steps is {max_steps}: the run ends before its first validation "
                              f"(after {first} training batches), but EarlyStopping monitors {stoppers[0]}, which "
                              f"validation logs; raise max_steps to at least {-(-first // accumulate)}, or validate "
                              "sooner (trainer.val_check_interval)")

    def _check_validation_feeds_the_plateau_scheduler(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        node = getattr(config.get("model"), "lr_scheduler", None)
        plateau = str(getattr(node, "class_path", "")).endswith("ReduceLROnPlateau")
        if not plateau or getattr(self.model, "scheduler_interval", "epoch") != "epoch":
            return
        trainer, monitor = self.trainer, self.model.task.monitor
        reader = (f"model.lr_scheduler ReduceLROnPlateau steps at each epoch's end on {monitor}, which validation "
                  "logs")
        batches, max_steps = self._training_batches_per_epoch(), trainer.max_steps
        accumulate = trainer.accumulate_grad_batches
        if batches is not None and max_steps not in (None, -1) and max_steps * accumulate < batches:
            return  # the run ends inside its first epoch (the transport audit's one step): the scheduler never steps
        if trainer.limit_val_batches == 0:
            where = _origin(self._argv, "trainer.limit_val_batches")
            raise ConfigError(f"{where}trainer.limit_val_batches is 0: validation is off, but {reader}; keep "
                              "validation on, or use another scheduler")
        every = trainer.check_val_every_n_epoch
        if every is not None and every > 1:
            where = _origin(self._argv, "trainer.check_val_every_n_epoch")
            raise ConfigError(f"{where}trainer.check_val_every_n_epoch is {every}: epochs end without a validation, "
                              f"but {reader}; validate every epoch, or use another scheduler")
        interval = validation_interval(trainer)
        if interval is None:
            where = _origin(self._argv, "trainer.val_check_interval")
            raise ConfigError(f"{where}trainer.val_check_interval is a time: epochs end without a validation, but "
                              f"{reader}; give a fraction of an epoch or a number of batches, or step the scheduler "
                              "by validation (model.scheduler_interval: step)")
        if every is None and isinstance(interval, int) and batches is not None and interval > batches:
            where = _origin(self._argv, "trainer.val_check_interval")
            raise ConfigError(f"{where}trainer.val_check_interval is {interval} batches across epochs of {batches}: "
                              f"the first epoch ends before the first validation, but {reader}; validate within the "
                              "first epoch, or step the scheduler by validation (model.scheduler_interval: step)")

    def _batches_before_first_validation(self) -> int | None:
        """Training batches (per process) before the first validation, as Lightning schedules it; None where the
        epoch's length cannot be told before the run (a loader without ``len``)."""
        trainer = self.trainer
        interval, every = validation_interval(trainer), trainer.check_val_every_n_epoch
        if not isinstance(interval, (int, float)):  # validation on the clock (Lightning's time-based interval)
            return None
        if every is None:  # validation by steps across epochs
            return int(interval)
        batches = self._training_batches_per_epoch()
        if batches is None:
            return None
        within = int(interval) if isinstance(interval, int) else max(1, int(batches * interval))
        return (every - 1) * batches + min(within, batches)

    def _training_batches_per_epoch(self) -> int | None:
        """Training batches of one epoch (per process, after ``limit_train_batches``); None where a loader has no
        ``len`` or the data is not a datamodule's."""
        trainer = self.trainer
        if self.datamodule is None or type(self.datamodule).train_dataloader is pl.LightningDataModule.train_dataloader:
            return None
        self.datamodule.setup("fit")
        try:
            batches = len(self.datamodule.train_dataloader())
        except TypeError:
            return None
        batches = -(-batches // max(1, trainer.world_size))  # each process gets its share (distributed sampler)
        limit = trainer.limit_train_batches
        return min(batches, int(limit)) if isinstance(limit, int) else int(batches * limit)

    def before_validate(self) -> None:
        self._check_checkpoint_fits_model()  # first: the data's hints may set it up
        self._check_data_fits_model()

    def before_test(self) -> None:
        self._check_checkpoint_fits_model()  # first: the data's hints may set it up
        self._check_data_fits_model()

    def before_predict(self) -> None:
        if type(self.datamodule).predict_dataloader is pl.LightningDataModule.predict_dataloader:
            raise ConfigError(f"predict: {type(self.datamodule).__name__} has no prediction data (no "
                              "predict_dataloader); `test --ckpt_path <file>` scores a checkpoint on the test split")
        self._check_checkpoint_fits_model()

    def after_fit(self) -> None:
        if self._saved_step is not None and self.trainer.global_step == self._saved_step:
            ckpt_path = self.config[self.subcommand].get("ckpt_path")
            limits = ", ".join(f"trainer.{k} {getattr(self.trainer, k)}" for k in ("max_epochs", "max_steps")
                               if getattr(self.trainer, k) not in (None, -1))
            raise ConfigError(f"fit --ckpt_path {ckpt_path}: the checkpoint (epoch {self.trainer.current_epoch}, step "
                              f"{self._saved_step}) is already where the run stops ({limits or 'its limits'}), so "
                              "nothing was trained; raise the limit to train on, or `test --ckpt_path` it")
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        datamodule = self.datamodule
        has_test = datamodule is not None and type(datamodule).test_dataloader is not pl.LightningDataModule.test_dataloader
        if not has_test or self.trainer.fast_dev_run:
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
        if ckpt_path and not Path(checkpoint.best_model_path).is_file():  # a resumed run's best, moved since
            rank_zero_warn(f"the best checkpoint {checkpoint.best_model_path} (recorded by the resumed run) is gone: "
                           "testing the final weights instead")
            ckpt_path = None
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


def _class_keys(node: Any, name: str, key: str = "") -> list[str]:
    """The dotted keys of ``node`` (a config as dicts and lists) whose ``class_path`` ends with the class ``name``
    (a list's entries share its key: ``trainer.callbacks``)."""
    if isinstance(node, list):
        return list(dict.fromkeys(k for item in node for k in _class_keys(item, name, key)))
    if not isinstance(node, dict):
        return []
    if str(node.get("class_path", "")).rsplit(".", 1)[-1] == name:
        return [key]
    return [k for child, value in node.items() for k in _class_keys(value, name, f"{key}.{child}" if key else child)]


#: What a run folder holds before its first step: the resolved config, the logger's files.
_UNTRAINED_RUN_FILES = re.compile(r"config\.yaml|hparams\.yaml|metrics\.csv|events\.out\.tfevents\..*")


def remove_untrained_run_folder(folder: Path) -> bool:
    """Remove ``folder`` if it holds only what a run writes before its first step (no checkpoint, nothing else)."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else None
    if files is None or not all(_UNTRAINED_RUN_FILES.fullmatch(p.name) for p in files):
        return False
    shutil.rmtree(folder)
    return True


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[own args] -- [CLI args for every run]`` -> (own, passthrough), for the tools that launch runs (sweep,
    graphs_reproduce, placements)."""
    if "--" not in argv:
        return list(argv), []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def user_error(err: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``err``: jsonargparse wraps one raised while it instantiates a class from the
    recipe (a DataModule's ``name: Coraa``) in its own ``ValueError``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


_TRAINER_KEYS = frozenset(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


def lightning_refusal(err: BaseException, argv: list[str]) -> str | None:
    """Lightning's own refusal of a setting, as one line naming the ``trainer.<key>`` and where it was set: any
    MisconfigurationException, and a ValueError or TypeError that Lightning raises about one of the Trainer's
    arguments (a ``val_check_interval`` longer than the epoch, an unknown ``strategy``, ``devices: -1`` on the CPU),
    or a package missing for a setting (``precision: transformer-engine``). Lightning's message says the fix."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    message = " ".join(str(err).split())
    key = next((w for w in re.findall(r"[A-Za-z_]+", message) if w in _TRAINER_KEYS), None)
    if isinstance(err, MisconfigurationException):
        pass
    elif isinstance(err, ModuleNotFoundError) and _raised_in_lightning(err):
        pass  # a setting whose extra package is not installed (`precision: transformer-engine`): its HINT says how
    elif not (isinstance(err, (ValueError, TypeError)) and key and _raised_in_lightning(err)):
        return None
    if key is None:  # "No supported gpu backend found!": the trainer flag whose value the message names, if typed
        typed = {a[len("--trainer."):]: v for a, v in _flag_values(argv) if a.startswith("--trainer.")}
        words = set(re.findall(r"\w+", message.lower()))
        key = next((k for k, v in typed.items()  # a package's name spells the value's dashes as underscores
                    if k in _TRAINER_KEYS and {v.lower(), v.lower().replace("-", "_")} & words), None)
    if key is None:
        recipes = _recipes(argv)
        return f"{', '.join(recipes) + ': ' if recipes else ''}Lightning refused the settings: {message}"
    return f"{_origin(argv, f'trainer.{key}')}trainer.{key}: {message}"


def _flag_values(argv: list[str]) -> list[tuple[str, str]]:
    """(word, next word) pairs of the command line with ``--key=value`` split in two: each flag with its value."""
    flat = [part for a in argv for part in (a.split("=", 1) if a.startswith("--") else [a])]
    return list(zip(flat, flat[1:]))


def _raised_in_lightning(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    packages = ("pytorch_lightning", "lightning_fabric", "lightning")
    return any(f"{os.sep}{package}{os.sep}" in where for package in packages)


def checkpoint_refusal(err: BaseException, argv: list[str]) -> str | None:
    """Lightning's or fsspec's refusal of the ``--ckpt_path`` it resolves itself (``hpc`` without an HPC
    checkpoint, ``registry`` without the model registry, a URL it cannot reach or whose filesystem package is not
    installed), as one line naming ``ckpt_path``; a local file is checked before anything is built."""
    ckpt_path = next((v for a, v in _flag_values(argv) if a == "--ckpt_path"), None)
    if ckpt_path is None or not isinstance(err, (FileNotFoundError, ValueError, ImportError)):
        return None
    message = " ".join(str(err).split())
    remote = "://" in ckpt_path and isinstance(err, ImportError)  # fsspec: "Install s3fs to access S3"
    if not (remote or ckpt_path in message or "ckpt_path" in message):
        return None
    return f"ckpt_path {ckpt_path}: {message}"


def as_user_error(err: BaseException, argv: list[str]) -> UserError | None:
    """What of ``err`` a user can fix, as a :class:`UserError` (one line): ours, also when jsonargparse wrapped it,
    or Lightning's refusal of a setting or of a checkpoint it resolves; None for anything else (a bug: its traceback
    stays)."""
    cause = user_error(err)
    if cause is not None:
        return cause
    argv = [str(a) for a in argv]
    refusal = lightning_refusal(err, argv) or checkpoint_refusal(err, argv)
    return ConfigError(refusal) if refusal is not None else None


def main(args: list[str] | None = None) -> int:
    argv = list(args) if args is not None else sys.argv[1:]
    try:
        run(args)
    except Exception as err:
        cause = as_user_error(err, argv)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    return 0

