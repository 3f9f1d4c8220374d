"""Method registry: methods register themselves; built-ins are imported on first use."""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editkit.hparams import HParams

# Built-in methods: name -> module whose import calls register_method (lazy, keeps import cheap).
_BUILTIN = {
    "dinm": "editkit.methods.dinm",
}
HPARAMS_DIR = Path(__file__).resolve().parent.parent / "hparams"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type[HParams]
    method_class: type


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, config_class: type[HParams], method_class: type) -> None:
    """Make ``method_class`` (configured by ``config_class``) available as ``name``."""
    key = name.lower()
    if not (isinstance(config_class, type) and issubclass(config_class, HParams)):
        raise TypeError(f"register_method({name!r}): config_class must subclass HParams")
    if not callable(getattr(method_class, "edit", None)):
        raise TypeError(f"register_method({name!r}): method_class needs an edit() method")
    _REGISTRY[key] = MethodSpec(key, config_class, method_class)


def list_methods() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def get_method(name: str) -> MethodSpec:
    key = name.lower()
    if key not in _REGISTRY and key in _BUILTIN:
        importlib.import_module(_BUILTIN[key])
    if key not in _REGISTRY:
        raise ValueError(f"unknown editing method {name!r}; available: {list_methods()}")
    return _REGISTRY[key]


def hparams_path(method: str, name: str) -> Path:
    """``hparams/<METHOD>/<name>.yaml`` of this project."""
    return HPARAMS_DIR / method.upper() / f"{name}.yaml"


def load_hparams(method: str, spec: HParams | Mapping[str, Any] | str | Path | None = None, **overrides: Any) -> HParams:
    """Settings for ``method`` from an HParams object, a dict, a YAML path, a short name
    (``"smollm2-135m"`` → ``hparams/DINM/smollm2-135m.yaml``) or None (the defaults)."""
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
            known = sorted(p.stem for p in (HPARAMS_DIR / method.upper()).glob("*.yaml"))
            raise FileNotFoundError(f"hparams {str(spec)!r} not found (looked at {path}); known for {method}: {known}")
        hparams = config_class.from_yaml(path)
    return hparams.replace(**overrides) if overrides else hparams
