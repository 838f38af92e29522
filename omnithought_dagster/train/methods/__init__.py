"""The distillation methods: one module each, one line each in METHODS.

A training run's spec names its method (`method.name`; no method: sft); `method_of` finds it here. Adding a method:
a module with a `Method` subclass (`base.py` says what each hook does) and a line below - or, from outside the package
(a plug-in, a test), `register(METHOD)` when its module is imported: the run's spec then names that module
(`method.module`), and the training process imports it before it asks for the method.
"""

from __future__ import annotations

from omnithought_dagster.train.methods import grpo, kd, opsd, prefix_mask_kd, sft
from omnithought_dagster.train.methods.base import Method

METHODS: dict[str, Method] = {m.name: m for m in (sft.METHOD, kd.METHOD, prefix_mask_kd.METHOD, opsd.METHOD, grpo.METHOD)}
BUILT_IN = frozenset(METHODS)


def register(method: Method) -> None:
    """Adds a method (a plug-in's, a test's) under its name; a name taken already is refused."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method


def unregister(name: str) -> None:
    """Takes a registered method away (a test's); the built-in ones stay."""
    if name not in BUILT_IN:
        METHODS.pop(name, None)


def method_of(spec_method: dict | None) -> Method:
    """The method of a run's spec (None: sft); a plug-in's module, which the spec names, is imported first."""
    name = spec_method["name"] if spec_method else "sft"
    if name not in METHODS and spec_method.get("module"):
        import importlib

        importlib.import_module(spec_method["module"])  # written by our asset from the registered method's class
    try:
        return METHODS[name]
    except KeyError:
        raise SystemExit(f"no training method {name!r}; methods: {', '.join(METHODS)}") from None
