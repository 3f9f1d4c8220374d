"""Decoding-time detoxifiers by name, for the command line and configs.

Built-ins are named as ``"module:Class"`` and imported on first use. A detoxifier class that can be
built from strings (``--detoxifier NAME --detoxifier-opt key=value ...``) has a classmethod
``from_options(model, tokenizer, **options) -> Detoxifier``; ``model`` is the generator, which
several methods also use as their base (DetoxiGen, Self-Debiasing)."""
from __future__ import annotations

import importlib
from typing import Any

_BUILTIN = {
    "dexperts": "editkit.decoding.dexperts:DExperts",
    "detoxigen": "editkit.decoding.detoxigen:DetoxiGen",
    "fgdilp": "editkit.decoding.fgdilp:FGDILP",
    "calibration": "editkit.decoding.calibration:CalibrationFusion",
    "selfdebias": "editkit.decoding.selfdebias:SelfDebiasing",
}
_REGISTRY: dict[str, type] = {}


def register_detoxifier(name: str, detoxifier_class: type) -> None:
    """Make ``detoxifier_class`` available as ``name``; a different class under a taken name is refused."""
    key = name.lower()
    if not callable(getattr(detoxifier_class, "from_options", None)):
        raise TypeError(f"register_detoxifier({name!r}): the class needs a from_options(model, tokenizer, **options) "
                        "classmethod")
    known = _REGISTRY.get(key)
    if known is not None and known is not detoxifier_class:
        raise ValueError(f"a detoxifier named {key!r} is already registered ({known.__qualname__})")
    _REGISTRY[key] = detoxifier_class


def list_detoxifiers() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def get_detoxifier(name: str) -> type:
    """The class registered as ``name`` (built-ins are imported on first use)."""
    key = name.lower()
    if key not in _REGISTRY and key in _BUILTIN:
        module, attr = _BUILTIN[key].split(":")
        register_detoxifier(key, getattr(importlib.import_module(module), attr))
    if key not in _REGISTRY:
        raise ValueError(f"unknown detoxifier {name!r}; available: {list_detoxifiers()}")
    return _REGISTRY[key]


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """{key: value} from KEY=VALUE strings (values stay strings: each class parses its own)."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"detoxifier options are KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def build_detoxifier(name: str, model: Any, tokenizer: Any, **options: str) -> Any:
    """An instance of the detoxifier registered as ``name`` for generator ``model``."""
    return get_detoxifier(name).from_options(model, tokenizer, **options)
