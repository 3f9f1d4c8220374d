"""MEND: a gradient-decomposition hyper-network (Mitchell et al., 2022) that maps the rank-1 factors of
an instance's gradient to a weight edit, meta-trained on SafeEdit-style records.

``editkit.edit(model, instance, method="mend", hparams={"archive": "out/mend"})`` edits with a trained
archive; :func:`train` (``editkit train mend``) produces one; without an archive the edit is the
plain gradient step (see :mod:`editkit.methods.mend.method`).
"""
from editkit.methods.mend.archive import ArchiveError, load_editor
from editkit.methods.mend.config import MENDConfig
from editkit.methods.mend.method import MEND
from editkit.methods.mend.training import TrainResult, train
from editkit.registry import register_method

__all__ = ["MEND", "MENDConfig", "ArchiveError", "TrainResult", "load_editor", "train"]

register_method("mend", MENDConfig, MEND)
