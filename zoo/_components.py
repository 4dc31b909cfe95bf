"""``python -m zoo components``: find every pluggable class of the zoo by introspection, as timm's ``list_models``."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
from collections.abc import Iterator

from lightning.pytorch import Callback, LightningDataModule, LightningModule

from zoo.contracts import FFN, Encoder, Fusion

PACKAGES = ("zoo", "datamodules", "lit_models")
KINDS: tuple[tuple[str, type], ...] = (
    ("encoder", Encoder),
    ("fusion", Fusion),
    ("ffn", FFN),
    ("datamodule", LightningDataModule),
    ("task", LightningModule),
    ("callback", Callback),
)


def _modules() -> Iterator[object]:
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            if info.name.rsplit(".", 1)[-1].startswith("_") and not info.ispkg:
                continue
            try:
                yield importlib.import_module(info.name)
            except ImportError as err:  # an optional dependency missing: list what can be listed, say what not
                print(f"(skipped {info.name}: {err})", file=sys.stderr)


def find_components() -> dict[str, list[type]]:
    """``{kind: [class, ...]}`` for every public class of the zoo's packages that is one of ``KINDS``."""
    found: dict[str, dict[str, type]] = {kind: {} for kind, _ in KINDS}
    for module in _modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            parts = cls.__module__.split(".")
            if parts[0] not in PACKAGES or any(p.startswith("_") for p in parts) or cls.__name__.startswith("_"):
                continue
            for kind, base in KINDS:
                if issubclass(cls, base) and cls is not base:
                    found[kind][f"{cls.__module__}.{cls.__qualname__}"] = cls
                    break
    return {kind: [classes[k] for k in sorted(classes)] for kind, classes in found.items()}


def _describe(param: inspect.Parameter) -> str:
    text = param.name
    if param.annotation is not inspect.Parameter.empty:
        annotation = (
            param.annotation if isinstance(param.annotation, str) else inspect.formatannotation(param.annotation)
        )
        text += f": {annotation}"
    if param.default is not inspect.Parameter.empty:
        default = param.default
        shown = f"{default.__module__}.{default.__qualname__}" if inspect.isclass(default) else repr(default)
        text += f" = {shown}"
    return text


def _signature(cls: type) -> str:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return ", ".join(_describe(p) for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m zoo components", description=__doc__)
    parser.add_argument("--kind", choices=[k for k, _ in KINDS], help="list one kind only")
    args = parser.parse_args(argv)
    for kind, classes in find_components().items():
        if args.kind and kind != args.kind:
            continue
        print(f"{kind}:")
        for cls in classes:
            print(f"  {cls.__module__}.{cls.__qualname__}({_signature(cls)})")
