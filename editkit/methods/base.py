"""The method contract: what an editing method is, so that everything generic (``editkit.edit``,
``editkit.fit``, the SafeEdit runner, the CLI, the probes) works with any of them by name.

A method is a class configured by one :class:`~editkit.hparams.HParams` subclass and registered with
:func:`editkit.register_method`. It declares a **scope**:

* ``"instance"`` — computes a patch from one record: ``edit(model, tokenizer, instance, **kw)``
  (DINM, FT-L, MEND with a trained archive);
* ``"dataset"`` — fits on many records and returns one patch for every later input:
  ``fit(model, tokenizer, instances, **kw)`` (SFT, DPO, Ext-Sub).

Both return an :class:`~editkit.result.EditResult` whose patch carries the whole change; the model
is left exactly as it came, also when the method raises. Keyword arguments every method accepts
(and may ignore): ``progress`` (show progress bars), for ``edit`` ``constraint_pool`` (other
records the caller allows the method to use as constraints, e.g. their benign knowledge pairs; the
SafeEdit runner passes records whose pairs it does not score), and for ``fit`` ``output_dir`` (a
folder where a long training keeps checkpoints, so that a second call with the same folder resumes
from the last one; None: nothing is kept). A method that learns a reusable artifact
(MEND's hyper-network) adds ``train``/``save``/``load`` with the fingerprint of the model it fits.

What a method prescribes at inference time (DINM appends its suffix prompt to every input) is its
config's :attr:`~editkit.hparams.HParams.eval_suffix`; nothing outside a method's package reads any
other of its settings.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from editkit.hparams import HParams
from editkit.instance import EditInstance
from editkit.result import EditResult

Scope = Literal["instance", "dataset"]
SCOPES: tuple[Scope, ...] = ("instance", "dataset")


class EditingMethod:
    """Base class of the weight-editing methods (subclass it, set ``name``, ``scope`` and
    ``config_class``, implement ``edit`` or ``fit``)."""

    name: ClassVar[str] = ""
    scope: ClassVar[Scope] = "instance"
    config_class: ClassVar[type[HParams]] = HParams

    def __init__(self, hparams: HParams) -> None:
        if not isinstance(hparams, self.config_class):
            raise ValueError(f"{type(self).__name__} needs {self.config_class.__name__}, got {type(hparams).__name__}")
        self.hparams = hparams

    def edit(self, model: Any, tokenizer: Any, instance: EditInstance, *, progress: bool = False,
             constraint_pool: Sequence[EditInstance] = (), **kwargs: Any) -> EditResult:
        """The patch for one record (instance-scope methods)."""
        raise NotImplementedError(f"{self.name} is a {self.scope}-scope method: use fit()")

    def fit(self, model: Any, tokenizer: Any, instances: Sequence[EditInstance], *, progress: bool = False,
            output_dir: str | None = None, **kwargs: Any) -> EditResult:
        """One patch from many records (dataset-scope methods)."""
        raise NotImplementedError(f"{self.name} is an {self.scope}-scope method: use edit()")


def method_problems(method_class: type) -> list[str]:
    """Why ``method_class`` does not satisfy the contract (empty when it does). Duck-typed, so a
    class need not inherit :class:`EditingMethod`: a ``scope`` and the matching callable suffice."""
    scope = getattr(method_class, "scope", "instance")
    if scope not in SCOPES:
        return [f"scope must be one of {SCOPES}, got {scope!r}"]
    entry = "edit" if scope == "instance" else "fit"
    implemented = getattr(method_class, entry, None)
    if not callable(implemented) or implemented is getattr(EditingMethod, entry):
        return [f"a {scope}-scope method needs a {entry}() method"]
    return []
