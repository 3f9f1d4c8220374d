"""editkit: detoxify language models by knowledge editing.

Locate the layer that carries toxic behaviour, edit it (DINM and friends), evaluate on SafeEdit,
save the edit as a small patch or a full checkpoint. Heavy modules load lazily, so
``import editkit`` is cheap.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_LAZY = {
    "edit": "editkit.api:edit",
    "fit": "editkit.api:fit",
    "EditResult": "editkit.result:EditResult",
    "locate": "editkit.localization:locate",
    "Localization": "editkit.localization:Localization",
    "Patch": "editkit.patch:Patch",
    "load_patch": "editkit.patch:load_patch",
    "save_checkpoint": "editkit.checkpoint:save_checkpoint",
    "load_checkpoint": "editkit.checkpoint:load_checkpoint",
    "EditInstance": "editkit.instance:EditInstance",
    "load_instances": "editkit.instance:load_instances",
    "HParams": "editkit.hparams:HParams",
    "load_hparams": "editkit.registry:load_hparams",
    "register_method": "editkit.registry:register_method",
    "get_method": "editkit.registry:get_method",
    "list_methods": "editkit.registry:list_methods",
    "load_model": "editkit.models:load_model",
    "load_default": "editkit.models:load_default",
    "generate": "editkit.generation.api:generate",
    "Detoxifier": "editkit.generation.detoxifier:Detoxifier",
    "DExperts": "editkit.decoding.dexperts:DExperts",
    "DetoxiGen": "editkit.decoding.detoxigen:DetoxiGen",
    "FGDILP": "editkit.decoding.fgdilp:FGDILP",
    "CalibrationFusion": "editkit.decoding.calibration:CalibrationFusion",
    "SelfDebiasing": "editkit.decoding.selfdebias:SelfDebiasing",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from editkit.api import edit, fit
    from editkit.checkpoint import load_checkpoint, save_checkpoint
    from editkit.decoding.calibration import CalibrationFusion
    from editkit.decoding.detoxigen import DetoxiGen
    from editkit.decoding.dexperts import DExperts
    from editkit.decoding.fgdilp import FGDILP
    from editkit.decoding.selfdebias import SelfDebiasing
    from editkit.generation.api import generate
    from editkit.generation.detoxifier import Detoxifier
    from editkit.hparams import HParams
    from editkit.instance import EditInstance, load_instances
    from editkit.localization import Localization, locate
    from editkit.models import load_default, load_model
    from editkit.patch import Patch, load_patch
    from editkit.registry import get_method, list_methods, load_hparams, register_method
    from editkit.result import EditResult


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'editkit' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
