"""``python -m zoo``: LightningCLI over every task and datamodule of the zoo.

* ``python -m zoo fit|validate|test|predict --config vqa.yaml``: a bare config name that is not a local file is
  looked up among the configs shipped in ``cli_configs/``.
* ``python -m zoo components``: every pluggable class by kind, with its constructor arguments.
* ``python -m zoo convert ...``: turn a QAT checkpoint into a real integer model (see ``zoo.quant.convert``);
  ``python -m zoo validate|test|predict --config vqa.yaml --converted MODEL.pt`` then runs that integer model.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from importlib import resources
from pathlib import Path

from jsonargparse import ActionSubCommands, Namespace, get_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from zoo.errors import ConfigError, DataError, ZooUserError

try:  # the config files being loaded, innermost last; only to name the file in a message (jsonargparse 4.53 has it)
    from jsonargparse._util import config_load_stack
except ImportError:
    config_load_stack = None


class ZooArgumentParser(LightningArgumentParser):
    """LightningCLI's parser that refuses an unknown key whose value is a mapping without a value in it, and that adds
    to the message refusing a key or a flag the option spelt most like it ("did you mean 'max_epochs'?").

    jsonargparse merges a config into the parsed one value by value (``Namespace.update`` copies the leaves), so such
    a key (``modle: {}``, ``trainer: {callbackz: {}}``, or ``callbackz: {}`` in a group's own file given as
    ``--trainer tr.yaml``) vanished before its check of the keys could refuse it, as it refuses the same key with any
    other value."""

    def parse_string(self, content: str, path: str = "", *args, **kwargs) -> Namespace:
        try:
            tree = get_loader(self.parser_mode)(content)
        except Exception:  # what does not load is jsonargparse's to report
            tree = None
        key = _dropped_key(self, tree) if isinstance(tree, dict) else None
        if key is not None:
            self.error(_hinted(self, f"Option '{key}' in {path or 'the --config string'} is not accepted"))
        return super().parse_string(content, path, *args, **kwargs)

    def _apply_actions(self, cfg, parent_key: str = "", *args, **kwargs) -> Namespace:
        # a group's own config file (``--trainer tr.yaml``) is checked here, under its group's name; jsonargparse has no
        # public hook between loading that file and merging it
        tree = cfg.as_dict() if isinstance(cfg, Namespace) else cfg
        # checked by the parser that owns the group: a root-level --config naming a subcommand's group file
        # (``fit: {trainer: tr.yaml}``) is loaded by the root parser, which has none of the group's options; the
        # subcommands' groups are alike, so the first subcommand that has the group checks it
        owner = _group_owner(self, parent_key) if parent_key and isinstance(tree, dict) else None
        key = _dropped_key(owner, tree, f"{parent_key}.") if owner is not None else None
        if key is not None:
            loading = config_load_stack.get() if config_load_stack is not None else ()  # (real path, path as given)
            where = loading[-1][1] if loading else f"the --{parent_key} config"
            self.error(_hinted(owner, f"Option '{key}' in {where} is not accepted"))
        return super()._apply_actions(cfg, parent_key, *args, **kwargs)

    def validate(self, namespace: Namespace, *args, **kwargs) -> None:
        try:
            super().validate(namespace, *args, **kwargs)
        except KeyError as err:  # jsonargparse's "Option 'lerning_rate' is not accepted" and the like
            hinted = _hinted(self, str(err))
            if hinted != str(err):
                err.args = (hinted, *err.args[1:])
            raise

    def error(self, message: str, ex: Exception | None = None):
        # a misspelt flag: argparse names it, without a hint (a subcommand's parser and then its parent report it)
        if message.startswith("unrecognized arguments: ") and "; did you mean" not in message:
            given = message.removeprefix("unrecognized arguments: ").split()
            flags = [a.split("=", 1)[0] for a in given if a.startswith("--")]
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = [close[0] for f in flags if (close := difflib.get_close_matches(f, known, n=1, cutoff=0.6))]
            if hints:
                message += f"; did you mean {', '.join(hints)}?"
        return super().error(message, ex)

    def parse_object(self, obj, *args, **kwargs) -> Namespace:
        # the arguments of a class given by class_path and init_args (its parser is of this class too)
        tree = obj.as_dict() if isinstance(obj, Namespace) else obj
        key = _dropped_key(self, tree) if isinstance(tree, dict) else None
        if key is not None:
            self.error(_hinted(self, f"Option '{key}' is not accepted"))
        return super().parse_object(obj, *args, **kwargs)


def _dropped_key(parser: argparse.ArgumentParser, tree: dict, branch: str = "") -> str | None:
    """The first key of ``tree`` (a loaded config, under the group ``branch``) that ``parser`` has no option for and
    whose value is a mapping without a value in it, or ``None``."""
    actions = parser._actions
    for key, value in tree.items():
        if not isinstance(value, dict):
            continue  # jsonargparse checks any other value
        name = f"{branch}{key}".removesuffix("+")
        subcommands = (a.choices for a in actions if isinstance(a, ActionSubCommands))
        subcommand = next((choices[name] for choices in subcommands if name in choices), None)
        if subcommand is not None:
            found = _dropped_key(subcommand, value)
            found = found and f"{name}.{found}"
        elif _has_group(parser, name):  # a group given by class_path is resolved whole
            found = None if "class_path" in value else _dropped_key(parser, value, f"{name}.")
        elif any(a.dest == name or f"--{name}" in a.option_strings for a in actions):
            found = None  # a typed value: its type checks it, a class's arguments in parse_object
        else:
            found = name if _holds_no_value(value) else None  # else jsonargparse refuses it
        if found is not None:
            return found
    return None


_REFUSED_KEY = re.compile(r"(?:Subcommand '([\w-]+)' does not accept option|Option) '([\w.-]+)'")


def _hinted(parser: argparse.ArgumentParser, message: str) -> str:
    """``message``, which refuses a key, with the option of ``parser`` spelt most like it, if one is close: a hint
    for a misspelt key, never applied."""
    hint = _closest_option(parser, message)
    return f"{message}; did you mean '{hint}'?" if hint else message


def _closest_option(parser: argparse.ArgumentParser, message: str) -> str | None:
    """The option of ``parser`` (or of the subcommand the message names) spelt most like the key a jsonargparse
    message refuses, or ``None``."""
    found = _REFUSED_KEY.search(message)
    if found is None:
        return None
    subcommand, key = found.groups()
    if subcommand:
        choices = (a.choices for a in parser._actions if isinstance(a, ActionSubCommands))
        parser = next((c[subcommand] for c in choices if subcommand in c), parser)
    options = {a.dest.removeprefix("init_args.") for a in parser._actions if a.dest and a.dest != argparse.SUPPRESS}
    options = {o for o in options if o not in ("help", "config") and not o.endswith(".help")}
    group = key.rpartition(".")[0]
    siblings = [o for o in options if o.rpartition(".")[0] == group] or list(options)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    return close[0] if close else None


def _has_group(parser: argparse.ArgumentParser, name: str) -> bool:
    """Whether ``name`` is a group of ``parser`` (trainer), not a class-typed option (model), under which there is
    only its ``--model.help``."""
    return any(a.dest.startswith(f"{name}.") and a.dest != f"{name}.help" for a in parser._actions)


def _group_owner(parser: argparse.ArgumentParser, group: str) -> argparse.ArgumentParser | None:
    """``parser`` if it has ``group``, else the first of its subcommands' parsers that has, else ``None``."""
    if _has_group(parser, group):
        return parser
    subcommands = (a.choices.values() for a in parser._actions if isinstance(a, ActionSubCommands))
    return next((sub for choices in subcommands for sub in choices if _has_group(sub, group)), None)


def _holds_no_value(value) -> bool:
    return isinstance(value, dict) and all(_holds_no_value(v) for v in value.values())


class ZooCLI(LightningCLI):
    """LightningCLI with any LightningModule as ``model`` and any LightningDataModule as ``data``.

    The datamodule's ``num_classes`` and ``group_names`` are linked into the model at instantiation,
    ``--test_after_fit true`` runs ``test`` on the best checkpoint when ``fit`` ends, a resumed fit
    (``--ckpt_path``) does not read the task's ``initial_checkpoint``, and ``--trainer.strategy adaptive`` lets
    :func:`zoo.parallel.plan.select_parallelism` pick single-device, DDP, FSDP or FSDP + tensor parallelism from the
    model's size and the devices.
    """

    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", ZooArgumentParser)
        # a value the parser rejects raises argparse.ArgumentError (which ``main`` prints) instead of exiting after
        # the usage of every option, a screenful above the one line that says what was wrong
        kwargs.setdefault(
            "parser_kwargs",
            {
                "exit_on_error": False,
                "prog": "python -m zoo",
                "description": "Train, validate, test and predict with the zoo's tasks and datamodules from YAML. "
                "Besides the subcommands below: `python -m zoo components` lists every pluggable class with its "
                "arguments; `python -m zoo convert --help` turns a QAT checkpoint into an integer model.",
            },
        )
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.group_names", "model.init_args.group_names", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, test the best checkpoint (fit only)."
        )
        parser.add_argument(
            "--converted",
            type=str | None,
            default=None,
            help="validate, test, predict: run the integer model that `python -m zoo convert` wrote (its layers and "
            "weights replace the configured model's; the config must describe the architecture it was converted from).",
        )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # `trainer.strategy: adaptive` is decided here, where the model exists and its size is known
        config = self._get(self.config_init, "trainer", default={})
        if config.get("strategy") == ADAPTIVE and "strategy" not in kwargs:
            from zoo.parallel.plan import select_parallelism

            per_node = _devices_per_node(config.get("accelerator", "auto"), config.get("devices", "auto"))
            if per_node < 1:  # select_parallelism would name its own argument, device_count=0
                raise ConfigError(
                    f"trainer.strategy=adaptive: trainer.accelerator={config.get('accelerator', 'auto')} finds no "
                    "device here (no CUDA device is visible: check CUDA_VISIBLE_DEVICES and the driver)"
                )
            plan = select_parallelism(
                self.model, per_node * int(config.get("num_nodes") or 1), devices_per_node=per_node
            )
            rank_zero_info(plan.describe())
            kwargs["strategy"] = plan.strategy()
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        self._resolve_last_checkpoint()
        if self.config_init[self.subcommand].get("converted"):
            raise ConfigError(
                "--converted runs an integer model in validate, test or predict; fit trains the float or QAT model "
                "that `python -m zoo convert` turns into one"
            )
        # a resumed run restores its own weights; its initial checkpoint need not exist any more
        if self.config_init[self.subcommand].get("ckpt_path") and getattr(self.model, "initial_checkpoint", None):
            self.model.initial_checkpoint = None

    def before_validate(self) -> None:
        self._resolve_last_checkpoint()
        self._load_converted()

    def before_test(self) -> None:
        self._resolve_last_checkpoint()
        self._load_converted()

    def before_predict(self) -> None:
        self._resolve_last_checkpoint()
        self._load_converted()
        config = self.config_init[self.subcommand]
        if not (config.get("ckpt_path") or config.get("converted")):  # initial_checkpoint is read by fit alone
            rank_zero_warn(
                "predict: no --ckpt_path or --converted: the predictions come from the model's initial, untrained "
                "weights"
            )
        # `python -m zoo predict` writes what it predicts (LightningCLI alone keeps it in memory and drops it)
        from lightning.pytorch.callbacks import BasePredictionWriter

        from zoo.callbacks.predictions import PredictionWriter

        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        argv = sys.argv[1:] if args is None else args
        given = _non_finite_options(argv)
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError:
            refused = _refused_non_finite(parser, argv, given) if given else None
            if refused is None:
                raise
            key, value = refused
            if _spells_nan(value):
                raise ConfigError(f"--{key}={value}: must be a number, not NaN") from None
            # YAML reads "inf" as a word; infinity is ".inf"
            raise ConfigError(f"--{key}={value}: not a number; YAML writes infinity as .inf") from None
        # YAML's ".nan" is a float, which a number takes
        for _, key, value in given:
            number = _number_at(self.config, key)
            if number is not None and math.isnan(number):
                raise ConfigError(f"--{key}={value}: must be a number, not NaN")
        # LightningCLI reads a given checkpoint's hyper-parameters next, before any hook of ours: look at the file first
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path != "last":
            from zoo.weights import check_lightning_checkpoint

            check_lightning_checkpoint(path)

    def _resolve_last_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest last checkpoint of any earlier run under the logger's folder.

        Lightning looks for it in this run's checkpoint folder only, which under a logger is a new ``version_N`` every
        run, so it never found the previous run's and trained from scratch. A checkpoint callback with its own
        ``dirpath`` (the same folder every run) and a run without a logger are left to Lightning, as is the case of
        no last checkpoint at all (Lightning warns and starts afresh: one command both starts and resumes a job)."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last" or not self.trainer.loggers:
            return
        logger = self.trainer.loggers[0]
        # the folders ModelCheckpoint resolves its dirpath to: <save_dir>/<name>/<version>/checkpoints
        root = Path(logger.save_dir or self.trainer.default_root_dir) / str(logger.name or "")
        found = [
            path
            for callback in self.trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None
            for path in root.glob(f"*/checkpoints/*{callback.FILE_EXTENSION}")
            if re.match(rf"^{callback.CHECKPOINT_NAME_LAST}(-(\d+))?", path.stem)  # Lightning's own test for "last"
        ]
        if found:
            config["ckpt_path"] = str(max(found, key=lambda path: path.stat().st_mtime))
            rank_zero_info(f"--ckpt_path last: {config['ckpt_path']}")
            from zoo.weights import check_lightning_checkpoint

            check_lightning_checkpoint(config["ckpt_path"], what="--ckpt_path last")

    def _load_converted(self) -> None:
        """``--converted PATH``: swap the configured model's layers for the integer ones saved at ``PATH`` and load
        them (:func:`zoo.quant.load_converted`)."""
        config = self.config_init[self.subcommand]
        path = config.get("converted")
        if not path:
            return
        if config.get("ckpt_path"):
            raise ConfigError("--converted and --ckpt_path both give the model's weights; give one of them")
        if not Path(path).is_file():
            raise DataError(f"--converted {path}: no such file (`python -m zoo convert --out` writes it)")
        from zoo.quant import load_converted

        try:
            load_converted(path, self.model)
        # load_state_dict's missing / unexpected / reshaped keys, over lines; a layer the configured model lacks
        except (RuntimeError, KeyError, AttributeError) as err:
            detail = " ".join(str(err).split())
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            raise ConfigError(
                f"--converted {path} does not fit the configured {type(self.model).__name__}; give the config of the "
                f"run it was converted from ({detail})"
            ) from None
        if getattr(self.model, "compile_options", False) is not False:
            import torch._inductor.config

            # compiled, the integer layers run oneDNN's GEMMs and convolutions only with their weights as graph
            # constants (zoo.quant.convert); the loop runs without gradients, where freezing applies
            torch._inductor.config.freezing = True

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def _spelt(value: str) -> str:
    """A number's spelling without its sign, case or surrounding blanks."""
    return value.strip().lower().lstrip("+-")


def _spells_nan(value: str) -> bool:
    return _spelt(value) in ("nan", ".nan")


def _non_finite_options(argv) -> list[tuple[int, str, str]]:
    """Each option of ``argv`` (``--key=value`` or ``--key value``) whose value spells NaN or infinity: the index in
    ``argv`` of the argument that holds the value, the key and the value."""
    found = []
    for i, arg in enumerate(argv if isinstance(argv, (list, tuple)) else []):
        key, inline, value = str(arg).removeprefix("--").partition("=")
        at = i if inline or i + 1 == len(argv) else i + 1
        value = value if at == i else str(argv[at])
        if str(arg).startswith("--") and _spelt(value) in ("nan", ".nan", "inf", ".inf", "infinity"):
            found.append((at, key, value))
    return found


def _refused_non_finite(
    parser: LightningArgumentParser, argv: list[str], given: list[tuple[int, str, str]]
) -> tuple[str, str] | None:
    """The key and value of the first NaN or infinity of ``argv`` (``given``: its :func:`_non_finite_options`) that
    ``parser`` refused for a number, or ``None``.

    YAML reads ``nan`` and ``inf`` as words, which jsonargparse refuses for a number in a dump over many lines: when
    the command line parses with 1 in their place, one of them is what it refused."""
    with_one = list(argv)
    for i, _, value in given:
        with_one[i] = with_one[i].removesuffix(value) + "1"
    try:  # without --print_config, which would print this config and exit
        config = parser.parse_args([arg for arg in with_one if not str(arg).startswith("--print_config")])
    except argparse.ArgumentError:
        return None
    return next(((key, value) for _, key, value in given if _number_at(config, key) is not None), None)


def _number_at(config: Namespace, key: str) -> float | None:
    """The number at ``key`` of the subcommand's (or else the whole) parsed ``config``, or ``None``."""
    subcommand = config.get("subcommand")
    value = config.get(f"{subcommand}.{key}") if subcommand else None
    value = config.get(key) if value is None else value
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


#: the value of ``trainer.strategy`` that lets :func:`zoo.parallel.plan.select_parallelism` choose the strategy
ADAPTIVE = "adaptive"


def _devices_per_node(accelerator, devices) -> int:
    """The device count a Trainer with these ``accelerator`` and ``devices`` arguments uses per node."""
    import torch
    from lightning.pytorch.accelerators import CUDAAccelerator

    on_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if on_cuda:
        if devices in ("auto", -1, "-1"):
            return CUDAAccelerator.auto_device_count()
        return len(CUDAAccelerator.parse_devices(devices) or [])
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if str(devices).isdigit() and int(devices) > 0:  # CPU processes (LightningCLI may pass "2" as a string)
        return int(devices)
    return 1


def packaged_config(name: str) -> Path | None:
    """The path of a config shipped in ``cli_configs/`` (``name`` with or without ``.yaml``), or ``None``."""
    folder = resources.files("cli_configs")
    for candidate in (name, f"{name}.yaml"):
        path = folder / candidate
        if path.is_file():
            return Path(str(path))
    return None


def resolve_config_args(argv: list[str]) -> list[str]:
    """Replace ``--config NAME`` / ``-c NAME`` / ``--config=NAME`` by the packaged file when ``NAME`` is not a local
    file but names a shipped config."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out += [arg, _resolve(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + _resolve(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


def _resolve(value: str) -> str:
    if Path(value).exists() or value.lstrip().startswith("{"):
        return value
    shipped = packaged_config(value)
    return str(shipped) if shipped is not None else value


_STRUCTURE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value")
_NOT_GIVEN = "- Expected a <class 'NoneType'>"


def _through_classes(message: str) -> str:
    """jsonargparse's report of a bad argument of a class given by ``class_path`` (every subtype of ``Optional[X]``
    tried, the given value repeated), as one line: the path of config keys and classes, then what was wrong::

        model (lit_models.VQA) > encoders (zoo.encoders.ConvImageEncoder): Option 'patch_sise' is not accepted

    Any other message, one where more than one subtype was a candidate among them, is returned as it is."""
    if _STRUCTURE[0] not in message:
        return message
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    chain, inner = [], []
    for line in lines:
        key = re.fullmatch(r'Parser key "([^"]+)":', line)
        given = re.fullmatch(r"(?:- )?Problem with given class_path '([^']+)':", line)
        if key:
            chain.append(key.group(1))
        elif given and chain:
            chain[-1] += f" ({given.group(1)})"
        elif line.startswith("- ") and not line.startswith(_NOT_GIVEN):
            return message  # another candidate's own error: the full report says which is which
        elif not line.startswith((*_STRUCTURE, _NOT_GIVEN)):
            inner.append(line)
    if not chain or not inner:
        return message
    return f"{' > '.join(chain)}: {' '.join(inner)}"


def _one_line(err: BaseException) -> str:
    # Errors raised in DataLoader workers come back with the worker's traceback in their message: keep the last line,
    # less the "zoo.errors.DataError: " the traceback puts before the worker's message. Another message over several
    # lines (Lightning's "You requested gpu: [0, 1]" / "But your machine only has: []") is joined.
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if not any("Traceback (most recent call last)" in line for line in lines):
        return " ".join(lines)
    cls = type(err)
    return lines[-1].removeprefix(f"{cls.__module__}.{cls.__qualname__}: ")


#: modules whose ValueErrors and TypeErrors are Lightning's checks of the trainer's settings (devices, strategy,
#: precision, the validation interval against the batches): they name the setting, so they are user errors
_LIGHTNING_CHECKS = (
    "lightning.pytorch.trainer.connectors.",
    "lightning.pytorch.loops.fit_loop",
    "lightning.fabric.accelerators.",  # the devices each accelerator accepts ("devices=-3" on the CPU)
    "lightning.pytorch.accelerators.",
)


def _raised_by_lightning_checks(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return isinstance(err, (ValueError, TypeError)) and module.startswith(_LIGHTNING_CHECKS)


def _user_error(err: BaseException, seen: set[int] | None = None) -> BaseException | None:
    """The user error behind ``err``: itself, one it was raised from, or one grouped in it (jsonargparse wraps the
    errors raised while it instantiates classes). User errors: the zoo's, a missing file, and Lightning's own
    complaints about the trainer's settings (``MisconfigurationException``, and the ``ValueError``s of its
    configuration checks)."""
    seen = seen if seen is not None else set()
    if err is None or id(err) in seen:
        return None
    seen.add(id(err))
    if isinstance(err, (ZooUserError, FileNotFoundError, MisconfigurationException)) or _raised_by_lightning_checks(
        err
    ):
        return err
    for inner in (*getattr(err, "exceptions", ()), err.__cause__, err.__context__):
        found = _user_error(inner, seen) if inner is not None else None
        if found is not None:
            return found
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m zoo`` and of the ``zoo`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "components":
            from zoo._components import main as components_main

            components_main(argv[1:])
            return
        if argv and argv[0] == "convert":
            from zoo.quant.convert import main as convert_main

            convert_main(argv[1:])
            return
        if from_command_line:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv[1:] = resolve_config_args(argv)
            ZooCLI()
        else:
            ZooCLI(args=resolve_config_args(argv))
    except argparse.ArgumentError as err:  # jsonargparse's message names the key and the expected type, over lines
        command = next((f" {a}" for a in argv[:1] if not a.startswith("-")), "")
        message = _through_classes(str(err))
        print(f"zoo: error: {message}\n(python -m zoo{command} --help lists the options)", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"zoo: error: {_one_line(user_error)}", file=sys.stderr)
        raise SystemExit(2) from None
