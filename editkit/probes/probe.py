"""Toxicity probe: logistic regression on mean-pooled residual-stream states of toxic vs non-toxic
text, whose normalised weight is the toxic direction the other probes measure against.

Data: ToxiGen demonstrations (hate = toxic, neutral = not) and SafeEdit generations (unsafe = toxic,
safe = not), each text tagged with its source. The held-apart split is by group — a SafeEdit record
(both its generations go to the same side) or a ToxiGen text — per source and seeded, so held
accuracy is reported per source on texts the probe never saw.

A probe is saved as ``probe.safetensors`` (its weight) + ``probe.json`` (bias, layer, settings,
metrics, fingerprints). It is tied to the base model it was trained on: the input embedding's
fingerprint must match (edits change decoder-layer projections, never the embedding, so an edited
copy of the base is still accepted — the point of the probe is to compare before and after an
edit), and so must the architecture. The probed layer's MLP output weight is fingerprinted too; a
mismatch there only means an edit is applied, and is logged.
"""
from __future__ import annotations

import json
import logging
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from editkit.arch import ArchMap, check_layer, embedding_name, mlp_out_name, resolve_arch
from editkit.devices import real_values
from editkit.instance import load_instances
from editkit.patch import atomic_write_dir, base_mismatch, fingerprint, fingerprint_matches, model_info
from editkit.probes.states import pooled
from editkit.text import ChatMode

log = logging.getLogger(__name__)

FORMAT = "editkit-probe"
FORMAT_VERSION = 1
WEIGHT_FILE = "probe.safetensors"
META_FILE = "probe.json"
TOXIGEN_FILE = "toxigen/toxigen_demonstrations.jsonl"
SAFEEDIT_FILE = "safeedit/safeedit_dev.json"
_TOXIGEN_LABELS = {"hate": 1, "neutral": 0}


class ProbeError(ValueError):
    """A probe file that cannot be read, or a probe used with a model it was not trained on."""


# -- data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeText:
    """One labelled text: ``label`` 1 = toxic, 0 = not; ``group`` keeps related texts on one side
    of the held-apart split (a SafeEdit record id, a ToxiGen text)."""

    text: str
    label: int
    source: str
    group: str

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 (non-toxic) or 1 (toxic), got {self.label!r} for {self.text[:40]!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"empty text in group {self.group!r}")


def _data_file(path: str | Path, default: str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / default
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def load_toxigen(path: str | Path) -> list[ProbeText]:
    """ToxiGen demonstrations (the JSONL file, or the shared-data folder holding it): ``hate`` → 1,
    ``neutral`` → 0, source ``"toxigen"``, grouped by normalised text (repeats stay together)."""
    path = _data_file(path, TOXIGEN_FILE)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        label, text = row.get("label"), row.get("text")
        if label not in _TOXIGEN_LABELS:
            raise ValueError(f"{path}:{n}: label must be one of {sorted(_TOXIGEN_LABELS)}, got {label!r}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{n}: missing or empty 'text'")
        out.append(ProbeText(text.strip(), _TOXIGEN_LABELS[label], "toxigen", f"toxigen:{_norm(text)}"))
    return out


def load_safeedit_generations(path: str | Path) -> list[ProbeText]:
    """SafeEdit records (the JSON file, or the shared-data folder holding it): each record's
    ``unsafe generation`` → 1 and ``safe generation`` → 0, source ``"safeedit"``, grouped by record id.
    Records are validated by :func:`editkit.instance.load_instances` (errors name record and field)."""
    out = []
    for inst in load_instances(_data_file(path, SAFEEDIT_FILE)):
        group = f"safeedit:{inst.id}"
        out.append(ProbeText(inst.unsafe.strip(), 1, "safeedit", group))
        out.append(ProbeText(inst.safe.strip(), 0, "safeedit", group))
    return out


def load_probe_texts(data_dir: str | Path, sources: Sequence[str] = ("toxigen", "safeedit")) -> list[ProbeText]:
    """The labelled texts of ``sources`` from the shared-data folder."""
    loaders = {"toxigen": load_toxigen, "safeedit": load_safeedit_generations}
    unknown = sorted(set(sources) - set(loaders))
    if unknown or not sources:
        raise ValueError(f"unknown probe data source(s) {unknown or list(sources)}; choose from {sorted(loaders)}")
    return [item for source in sources for item in loaders[source](data_dir)]


def split_held_out(items: Sequence[ProbeText], held_fraction: float = 0.2,
                   seed: int = 0) -> tuple[list[ProbeText], list[ProbeText]]:
    """(train, held): per source, ``held_fraction`` of the groups (seeded) are held apart, so no
    SafeEdit record or ToxiGen text is on both sides. A held text that also occurs verbatim in the
    training part (e.g. the same refusal in two records) is dropped from the held part."""
    if not 0.0 <= held_fraction < 1.0:
        raise ValueError(f"held_fraction must be in [0, 1), got {held_fraction}")
    by_source: dict[str, set[str]] = defaultdict(set)
    for item in items:
        by_source[item.source].add(item.group)
    held_groups: set[str] = set()
    for source, members in by_source.items():
        groups = sorted(members)  # a fixed order, independent of the items' order
        random.Random(f"{seed}:{source}").shuffle(groups)
        n_held = round(held_fraction * len(groups))
        if held_fraction > 0 and len(groups) >= 2:
            n_held = min(max(n_held, 1), len(groups) - 1)  # both sides non-empty
        held_groups.update(groups[:n_held])
    train = [it for it in items if it.group not in held_groups]
    seen = {_norm(it.text) for it in train}
    held = [it for it in items if it.group in held_groups and _norm(it.text) not in seen]
    dropped = sum(it.group in held_groups for it in items) - len(held)
    if dropped:
        log.info("dropped %d held text(s) that also occur in the training part", dropped)
    return train, held


# -- fitting -------------------------------------------------------------------------------------
def fit_logistic(features: torch.Tensor | np.ndarray, labels: Sequence[int] | np.ndarray, *, C: float = 1.0,
                 max_iter: int = 2000, seed: int = 0) -> tuple[torch.Tensor, float]:
    """(weight [d] float32, bias) of an L2-regularised logistic regression (scikit-learn) on
    ``features`` [n, d] with 0/1 ``labels``: P(1) = sigmoid(weight · x + bias) on raw features.

    Features are centred and divided by one global scale (their RMS) before fitting, then weight and
    bias are mapped back: the regularisation then does not depend on the model's activation scale,
    and the direction keeps the residual stream's geometry (per-dimension standardisation would tilt
    it towards low-variance dimensions), so it can be compared with value vectors."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:  # scikit-learn is an optional extra
        raise ImportError("the toxicity probe needs scikit-learn: pip install scikit-learn") from err
    x = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, float)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be [n, d] with one label per row; got {x.shape} and {len(y)} labels")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError(f"labels must hold both classes 0 and 1, got {sorted(set(np.unique(y).tolist()))}")
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    center = x.mean(0)
    scale = float(np.sqrt(((x - center) ** 2).mean())) or 1.0  # constant features: nothing to scale
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit((x - center) / scale, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("the probe's logistic regression did not converge in %d iterations; raise max_iter", max_iter)
    weight = clf.coef_[0] / scale  # w'·(x − c)/s + b' = (w'/s)·x + (b' − (w'/s)·c)
    bias = float(clf.intercept_[0] - weight @ center)
    return torch.tensor(weight, dtype=torch.float32), bias


def accuracy_by_source(labels: Sequence[int], probs: Sequence[float] | np.ndarray,
                       sources: Sequence[str]) -> dict[str, dict[str, float]]:
    """{"all" and each source: {"accuracy", "n"}} with the decision threshold 0.5."""
    correct = (np.asarray(probs) >= 0.5).astype(int) == np.asarray(labels)
    out: dict[str, dict[str, float]] = {}
    for key in ["all", *sorted(set(sources))]:
        mask = np.ones(len(correct), bool) if key == "all" else np.asarray(sources) == key
        if mask.any():
            out[key] = {"accuracy": float(correct[mask].mean()), "n": int(mask.sum())}
    return out


# -- the probe -----------------------------------------------------------------------------------
@dataclass
class ToxicityProbe:
    """A linear toxicity classifier on the mean-pooled output of decoder layer ``layer``:
    P(toxic) = sigmoid(weight · h + bias). ``direction`` is the unit toxic direction."""

    weight: torch.Tensor  # [d_model]
    bias: float
    layer: int
    base_fingerprint: dict[str, Any] = field(default_factory=dict)  # must match (input embedding)
    layer_fingerprint: dict[str, Any] = field(default_factory=dict)  # probed layer's MLP output (advisory)
    model: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # how texts are read: max_length, chat_template
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.weight, torch.Tensor) or self.weight.ndim != 1:
            raise ProbeError("a probe's weight must be a 1-d tensor [d_model]")
        if not torch.isfinite(self.weight).all() or not np.isfinite(self.bias) or not self.weight.any():
            raise ProbeError("a probe's weight must be finite and non-zero, its bias finite")
        self.weight = self.weight.detach().to("cpu", torch.float32)
        self.bias = float(self.bias)
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @classmethod
    def from_weight(cls, model: nn.Module, weight: torch.Tensor, bias: float = 0.0, layer: int = -1, *,
                    arch: ArchMap | Mapping[str, Any] | None = None, **meta: Any) -> ToxicityProbe:
        """A probe for ``model`` from a given weight (e.g. a direction found elsewhere): records the
        model's fingerprints so the probe refuses other models."""
        arch = resolve_arch(model, arch)
        layer = check_layer(model, arch, layer)
        embedding = embedding_name(model)
        if weight.shape[-1:] != real_values(model, embedding).shape[-1:]:
            raise ProbeError(f"probe weight has {weight.shape[-1]} entries; the model's residual stream has "
                             f"{real_values(model, embedding).shape[-1]}")
        projection = mlp_out_name(model, arch, layer)
        return cls(weight=weight, bias=bias, layer=layer,
                   base_fingerprint={embedding: fingerprint(real_values(model, embedding))},
                   layer_fingerprint={projection: fingerprint(real_values(model, projection))},
                   model=model_info(model), **meta)

    @property
    def direction(self) -> torch.Tensor:
        """[d_model] the unit toxic direction (the normalised weight)."""
        return self.weight / self.weight.norm()

    @property
    def d_model(self) -> int:
        return int(self.weight.numel())

    # -- checks ------------------------------------------------------------------------------------
    def check_model(self, model: nn.Module, arch: ArchMap | Mapping[str, Any] | None = None) -> None:
        """Raise :class:`ProbeError` unless ``model`` is (an edited copy of) the model this probe was
        trained on: same architecture and the same input embedding."""
        problem = base_mismatch(model, self.model, self.base_fingerprint)
        if problem is not None:
            raise ProbeError(f"the model's weights differ from those this probe was trained on "
                             f"({self._trained_on()}), which was {problem}; train a probe for this model")
        arch = resolve_arch(model, arch)
        if self.layer >= len(model.get_submodule(arch.layers)):
            raise ProbeError(f"probe layer {self.layer} is out of range for this model")
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, recorded in self.layer_fingerprint.items():
            if name in params and not fingerprint_matches(real_values(model, name), recorded):
                log.info("%s differs from the weight the probe was trained with (an edit is applied)", name)

    def _trained_on(self) -> str:
        return self.model.get("name_or_path") or self.model.get("model_type") or "another model"

    # -- predicting --------------------------------------------------------------------------------
    def proba_from_features(self, features: torch.Tensor) -> np.ndarray:
        """[n] P(toxic) for pooled states ``features`` [n, d_model]."""
        if features.ndim != 2 or features.shape[1] != self.d_model:
            raise ValueError(f"features must be [n, {self.d_model}], got {list(features.shape)}")
        logits = features.detach().to("cpu", torch.float32) @ self.weight + self.bias
        return torch.sigmoid(logits).numpy().astype(np.float64)

    def features(self, model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16,
                 progress: bool = True, arch: ArchMap | Mapping[str, Any] | None = None) -> torch.Tensor:
        """[n, d_model] the pooled states this probe reads (after checking the model)."""
        self.check_model(model, arch)
        states = pooled(model, tokenizer, texts, [self.layer], read="output", batch_size=batch_size,
                        progress=progress, arch=arch, desc="probe states",
                        max_length=int(self.settings.get("max_length", 512)),
                        chat_template=self.settings.get("chat_template", "none"))
        return states[self.layer]

    def predict_proba(self, model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16,
                      progress: bool = True, arch: ArchMap | Mapping[str, Any] | None = None) -> np.ndarray:
        """[n] P(toxic) of each text under ``model`` (refused for a model the probe was not trained on)."""
        return self.proba_from_features(self.features(model, tokenizer, texts, batch_size=batch_size,
                                                      progress=progress, arch=arch))

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (without the weight itself)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "layer": self.layer, "bias": self.bias,
                "d_model": self.d_model, "weight_norm": float(self.weight.norm()),
                "base_fingerprint": self.base_fingerprint, "layer_fingerprint": self.layer_fingerprint,
                "model": self.model, "settings": self.settings, "metrics": self.metrics, "created": self.created}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``path/probe.safetensors`` and ``path/probe.json`` atomically."""
        from safetensors.torch import save_file

        meta = json.dumps(self.to_dict(), indent=2, default=str)

        def write(tmp: Path) -> None:
            save_file({"weight": self.weight.contiguous()}, str(tmp / WEIGHT_FILE), metadata={"format": FORMAT})
            (tmp / META_FILE).write_text(meta, encoding="utf-8")

        atomic_write_dir(Path(path), write, overwrite=overwrite)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, *,
             arch: ArchMap | Mapping[str, Any] | None = None) -> ToxicityProbe:
        """Read a probe saved by :meth:`save`; with ``model``, also check it is the probe's model."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META_FILE).is_file() or not (path / WEIGHT_FILE).is_file():
            raise ProbeError(f"{path} is not an editkit probe (needs {META_FILE} and {WEIGHT_FILE})")
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ProbeError(f"{path}: unsupported probe format {meta.get('format')!r} v{meta.get('format_version')}")
        tensors = load_file(str(path / WEIGHT_FILE))
        if set(tensors) != {"weight"} or tensors["weight"].numel() != meta.get("d_model"):
            raise ProbeError(f"{path}: {WEIGHT_FILE} does not hold the {meta.get('d_model')}-entry weight "
                             f"{META_FILE} names")
        probe = cls(weight=tensors["weight"], bias=meta["bias"], layer=int(meta["layer"]),
                    base_fingerprint=meta.get("base_fingerprint", {}),
                    layer_fingerprint=meta.get("layer_fingerprint", {}), model=meta.get("model", {}),
                    settings=meta.get("settings", {}), metrics=meta.get("metrics", {}),
                    created=meta.get("created", ""))
        if model is not None:
            probe.check_model(model, arch)
        return probe


def load_probe(path: str | Path, model: nn.Module | None = None, **kwargs: Any) -> ToxicityProbe:
    """Read a probe saved by :meth:`ToxicityProbe.save` (checked against ``model`` if given)."""
    return ToxicityProbe.load(path, model, **kwargs)


def train_probe(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[ProbeText],
    *,
    layer: int = -1,
    held_fraction: float = 0.2,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 2000,
    batch_size: int = 16,
    max_length: int = 512,
    chat_template: ChatMode = "none",
    progress: bool = True,
    arch: ArchMap | Mapping[str, Any] | None = None,
) -> ToxicityProbe:
    """Fit a probe on the output of decoder layer ``layer`` (default the last) for ``items``, hold
    ``held_fraction`` of each source's groups apart (:func:`split_held_out`) and record accuracy per
    source in ``probe.metrics`` ({"train": …, "held": …}). All texts are read in one pass."""
    items = list(items)
    if not items:
        raise ValueError("no probe texts given")
    arch = resolve_arch(model, arch)
    layer = check_layer(model, arch, layer)
    train, held = split_held_out(items, held_fraction, seed)
    both = train + held
    states = pooled(model, tokenizer, [it.text for it in both], [layer], read="output", batch_size=batch_size,
                    max_length=max_length, chat_template=chat_template, progress=progress, arch=arch,
                    desc="probe states")[layer]  # [n, d_model]
    weight, bias = fit_logistic(states[:len(train)], [it.label for it in train], C=C, max_iter=max_iter, seed=seed)
    probe = ToxicityProbe.from_weight(model, weight, bias, layer, arch=arch,
                                      settings={"max_length": max_length, "chat_template": chat_template})
    probs = probe.proba_from_features(states)
    metrics: dict[str, Any] = {
        "train": accuracy_by_source([it.label for it in train], probs[:len(train)], [it.source for it in train]),
        "held": accuracy_by_source([it.label for it in held], probs[len(train):], [it.source for it in held]),
        "held_fraction": held_fraction, "seed": seed, "C": C,
    }
    probe.metrics = metrics
    log.info("toxicity probe on layer %d: held accuracy %s", layer,
             {k: round(v["accuracy"], 3) for k, v in metrics["held"].items()})
    return probe


def evaluate_probe(probe: ToxicityProbe, model: nn.Module, tokenizer: Any, items: Sequence[ProbeText], *,
                   batch_size: int = 16, progress: bool = True,
                   arch: ArchMap | Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Accuracy of ``probe`` on labelled ``items`` under ``model``, overall and per source."""
    items = list(items)
    probs = probe.predict_proba(model, tokenizer, [it.text for it in items], batch_size=batch_size,
                                progress=progress, arch=arch)
    return accuracy_by_source([it.label for it in items], probs, [it.source for it in items])
