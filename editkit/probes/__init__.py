"""Mechanism analysis: does an edit erase the toxic region or route around it?

* :mod:`~editkit.probes.probe` — the toxicity probe (logistic regression on pooled residual states)
  and loaders for the ToxiGen / SafeEdit texts it is trained on;
* :mod:`~editkit.probes.region` — region toxicity: value vectors of an MLP output projection vs the
  toxic direction, and the toxicity reduction rate of an edit;
* :mod:`~editkit.probes.shift` — activation shift at the projections' input, per layer;
* :mod:`~editkit.probes.projection` — safe/unsafe states on the mean-shift direction and PC1;
* :mod:`~editkit.probes.plots` — bar charts, shift curves, projection scatter (PNG);
* :mod:`~editkit.probes.states` — the shared reader: batched, masked means over real tokens.

Names load lazily, so importing this package pulls in neither scikit-learn nor matplotlib.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "ProbeError": "probe", "ProbeText": "probe", "ToxicityProbe": "probe", "load_probe": "probe",
    "train_probe": "probe", "evaluate_probe": "probe", "fit_logistic": "probe", "accuracy_by_source": "probe",
    "load_toxigen": "probe", "load_safeedit_generations": "probe", "load_probe_texts": "probe",
    "split_held_out": "probe",
    "RegionToxicity": "region", "RegionComparison": "region", "ToxicVector": "region", "value_vectors": "region",
    "region_toxicity": "region", "region_profile": "region", "toxicity_reduction_rate": "region",
    "compare_region_toxicity": "region",
    "ActivationShift": "shift", "mlp_input_means": "shift", "activation_shift": "shift",
    "activation_shift_rate": "shift", "measure_activation_shift": "shift",
    "Projection": "projection", "ProjectedSet": "projection", "ProjectionAxes": "projection",
    "projection_axes": "projection", "project_states": "projection",
    "plot_rates": "plots", "plot_shift_curves": "plots", "plot_projection": "plots",
    "Applicable": "states", "pooled": "states",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from editkit.probes.plots import plot_projection, plot_rates, plot_shift_curves
    from editkit.probes.probe import (ProbeError, ProbeText, ToxicityProbe, accuracy_by_source, evaluate_probe,
                                      fit_logistic, load_probe, load_probe_texts, load_safeedit_generations,
                                      load_toxigen, split_held_out, train_probe)
    from editkit.probes.projection import Projection, ProjectedSet, ProjectionAxes, project_states, projection_axes
    from editkit.probes.region import (RegionComparison, RegionToxicity, ToxicVector, compare_region_toxicity,
                                       region_profile, region_toxicity, toxicity_reduction_rate, value_vectors)
    from editkit.probes.shift import (ActivationShift, activation_shift, activation_shift_rate, mlp_input_means,
                                      measure_activation_shift)
    from editkit.probes.states import Applicable, pooled


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'editkit.probes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"editkit.probes.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
