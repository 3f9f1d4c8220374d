"""Method registry: methods register themselves; built-ins are imported on first use.

Built-in methods are named here as ``"module:Class"`` strings (lm-evaluation-harness style), so
``import editkit`` imports no method; a method's package calls :func:`register_method` at import.
Settings presets ship inside the package: ``editkit/presets/<METHOD>/<model>.yaml``.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editkit.hparams import HParams

# Built-in methods: name -> module whose import registers it (lazy, keeps `import editkit` cheap).
_BUILTIN = {
    "dinm": "editkit.methods.dinm",
    "ft-l": "editkit.methods.ft",
    "sft": "editkit.methods.sft",
    "dpo": "editkit.methods.dpo",
    "extsub": "editkit.methods.extsub",
    "mend": "editkit.methods.mend",
}
# Methods that train a reusable artifact from the command line (``editkit train NAME``): name ->
# "module:function" adding the NAME subcommand to ``editkit train`` (imported when the CLI is built).
_TRAIN_COMMANDS = {
    "mend": "editkit.methods.mend.cli:add_train_command",
    # the learnt parts of the decoding-time detoxifiers
    "detoxigen": "editkit.decoding.train_cli:add_detoxigen_command",
    "anti-expert": "editkit.decoding.train_cli:add_anti_expert_command",
    "calibration": "editkit.decoding.train_cli:add_calibration_command",
}
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type[HParams]
    method_class: type

    @property
    def scope(self) -> str:
        """``"instance"`` or ``"dataset"`` (see :mod:`editkit.methods.base`)."""
        return getattr(self.method_class, "scope", "instance")


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, config_class: type[HParams], method_class: type) -> None:
    """Make ``method_class`` (configured by ``config_class``) available as ``name``.

    A name is registered once: a second, different registration under the same name is refused
    (registering the very same classes again, as a module reload does, is a no-op)."""
    from editkit.methods.base import method_problems

    key = name.lower()
    if not (isinstance(config_class, type) and issubclass(config_class, HParams)):
        raise TypeError(f"register_method({name!r}): config_class must subclass HParams")
    if not isinstance(method_class, type):
        raise TypeError(f"register_method({name!r}): method_class must be a class")
    problems = method_problems(method_class)
    if problems:
        raise TypeError(f"register_method({name!r}): {'; '.join(problems)}")
    spec = MethodSpec(key, config_class, method_class)
    known = _REGISTRY.get(key)
    if known is not None and (known.config_class, known.method_class) != (config_class, method_class):
        raise ValueError(f"a method named {key!r} is already registered ({known.method_class.__module__}."
                         f"{known.method_class.__qualname__}); choose another name")
    _REGISTRY[key] = spec


def list_methods(scope: str | None = None) -> list[str]:
    """Names of the registered and built-in methods; ``scope="instance"``/``"dataset"`` filters
    by kind (this imports the built-ins to read their scope)."""
    if scope is None:
        return sorted(set(_REGISTRY) | set(_BUILTIN))
    return sorted(name for name in set(_REGISTRY) | set(_BUILTIN) if get_method(name).scope == scope)


def train_commands() -> dict[str, Any]:
    """{name: function adding its ``editkit train`` subcommand}: the built-in methods that
    meta-train an artifact (MEND) and the learnt parts of the decoding-time detoxifiers."""
    commands = {}
    for name, target in _TRAIN_COMMANDS.items():
        module, attr = target.split(":")
        commands[name] = getattr(importlib.import_module(module), attr)
    return commands


def get_method(name: str) -> MethodSpec:
    key = name.lower()
    if key not in _REGISTRY and key in _BUILTIN:
        importlib.import_module(_BUILTIN[key])
    if key not in _REGISTRY:
        raise ValueError(f"unknown editing method {name!r}; available: {list_methods()}")
    return _REGISTRY[key]


def hparams_path(method: str, name: str) -> Path:
    """The shipped preset ``editkit/presets/<METHOD>/<name>.yaml``."""
    return PRESETS_DIR / method.upper() / f"{name}.yaml"


def load_hparams(method: str, spec: HParams | Mapping[str, Any] | str | Path | None = None, **overrides: Any) -> HParams:
    """Settings for ``method`` from an HParams object, a dict, a YAML path, a preset name
    (``"smollm2-135m"`` → ``editkit/presets/DINM/smollm2-135m.yaml``) or None (the defaults)."""
    config_class = get_method(method).config_class
    if isinstance(spec, HParams):
        if not isinstance(spec, config_class):
            raise ValueError(f"hparams of type {type(spec).__name__} given for method {method!r}")
        hparams = spec
    elif spec is None:
        hparams = config_class()
    elif isinstance(spec, Mapping):
        hparams = config_class.from_dict(spec)
    else:
        path = Path(spec)
        # a short name may contain dots (qwen2.5-0.5b), so only a .yaml/.yml suffix marks a path
        if path.suffix.lower() not in (".yaml", ".yml") and not path.exists():
            path = hparams_path(method, str(spec))
        if not path.is_file():
            known = sorted(p.stem for p in (PRESETS_DIR / method.upper()).glob("*.yaml"))
            raise FileNotFoundError(f"hparams {str(spec)!r} not found (looked at {path}); presets for {method}: {known}")
        hparams = config_class.from_yaml(path)
    return hparams.replace(**overrides) if overrides else hparams
