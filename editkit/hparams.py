"""HParams: typed algorithm settings, loaded strictly from YAML or a dict.

One loader for every method: unknown keys are refused by name, values are coerced by the field's
type (PyYAML reads ``5e-4`` as a string), and subclasses validate in ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml

H = TypeVar("H", bound="HParams")


def hp(default: Any, help: str, *, runtime: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with a help string (shown by ``HParams.describe``). ``runtime``: the setting
    changes how a result is computed (e.g. a cache), never the result, so a resumed run may differ in it."""
    metadata = {"help": help, "runtime": runtime}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{name}: cannot be None")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{name}[]") for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                raise ValueError(f"{name}: expected an integer, got {value!r}") from None
            if as_float.is_integer():
                return int(as_float)
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass
class HParams:
    """Base class of every method's settings. Subclasses are dataclasses with ``hp(...)`` fields."""

    method: ClassVar[str] = ""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[H], data: Mapping[str, Any], *, source: str = "hparams") -> H:
        """Build from a mapping; unknown keys and badly typed values raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        data = dict(data)
        declared = data.pop("method", None) or data.pop("alg_name", None)
        if declared is not None and cls.method and str(declared).lower() != cls.method.lower():
            raise ValueError(f"{source}: settings are for method {declared!r}, not {cls.method!r}")
        hints = typing.get_type_hints(cls)
        names = cls.field_names()
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {names}")
        kwargs = {key: _coerce(value, hints[key], f"{source}: {key}") for key, value in data.items()}
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls: type[H], path: str | Path) -> H:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"hparams file not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return cls.from_dict(data, source=str(path))

    def replace(self: H, **changes: Any) -> H:
        """A validated copy with some settings changed."""
        return type(self).from_dict({**self.to_dict(), **changes}, source=type(self).__name__)

    @property
    def eval_suffix(self) -> str | None:
        """Text the method prescribes after every prompt at inference time (None: nothing)."""
        return None

    @classmethod
    def runtime_fields(cls) -> frozenset[str]:
        """The settings declared ``runtime`` (see :func:`hp`)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime"))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump({"method": self.method, **self.to_dict()}, sort_keys=False)

    @classmethod
    def describe(cls) -> str:
        """One line per setting: name, default and help."""
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"{f.name} = {default!r}  # {f.metadata.get('help', '')}")
        return "\n".join(lines)

    # helpers for subclasses' __post_init__
    def _check(self, condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(f"{type(self).__name__}: {message}")
