"""MEND settings: which weights are edited, the editor network's shape, the meta-training objective
and loop, and the archive an edit uses.

Names follow the rest of editkit, with MEND's own names in the help strings: ``lr`` is MEND's
``edit_lr`` (the step an edit takes; a learned rate per weight, initialised here), ``meta_lr`` is
MEND's ``lr`` (the editor's optimiser), ``lr_lr`` the learned edit rates' optimiser rate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from editkit.hparams import HParams, hp
from editkit.methods.dinm.config import SUFFIX


@dataclass
class MENDConfig(HParams):
    method: ClassVar[str] = "mend"

    # -- the edit ------------------------------------------------------------------------------------
    archive: str | None = hp(None, "folder of an editor trained by `editkit train mend` (its weights, the layers it "
                                   "edits and the model it was trained for come from there); null: an untrained "
                                   "editor, identity-initialised, i.e. the plain gradient step dW = -lr * grad_W NLL")
    lr: float = hp(1e-4, "edit learning rate (MEND's edit_lr): the step of an untrained editor, and the initial "
                         "value of the per-weight learned rates during meta-training")
    lr_scale: float = hp(1.0, "multiply every edit's step by this at edit time (1: the learned or given rate)")
    layers: list[int] = hp([-3, -2, -1], "decoder layers whose MLP weights are edited (negative counts from the top)")
    modules: list[str] = hp([], "projections to edit inside each of those layers, relative to the layer (e.g. "
                                "mlp.down_proj); empty: every linear projection of the MLP block that holds the "
                                "architecture map's mlp_out (llama: gate/up/down_proj; GPT-2: c_fc, c_proj)")
    suffix: str = hp(SUFFIX, "suffix system prompt appended to the attack and knowledge prompts (DINM's)")
    use_suffix: bool = hp(True, "append the suffix during meta-training, editing and evaluation")
    chat_template: Literal["auto", "none"] = hp("auto", "render prompts with the tokenizer's chat template, if any")
    max_length: int = hp(1024, "token budget of one prompt+answer sequence")

    # -- the editor network (fixed by the archive once trained) ---------------------------------------
    rank: int = hp(1920, "rank of each low-rank layer of the editor MLP (capped at its width d_in + d_out)")
    n_hidden: int = hp(1, "hidden (ReLU) residual layers of the editor MLP, before its linear output layer")
    normalize: bool = hp(True, "feed the editor the factors standardised by running statistics of meta-training")

    # -- meta-training --------------------------------------------------------------------------------
    c_edit: float = hp(0.1, "weight of NLL(safe | attack + suffix) after the edit in the meta-training loss")
    c_loc: float = hp(1.0, "weight of KL(p_unedited || p_edited) on the locality pairs")
    generalization_inputs: int = hp(0, "also score the safe response after this many of the record's generalisation "
                                       "inputs (DG_onlyQ, DG_otherA, ...) in the edit term (MEND's equivalence set)")
    benign_constraint: int = hp(4, "benign requests (editkit/data/constraint_requests.json) answered by the unedited "
                                   "model itself, each without and with the suffix, in each record's locality pairs")
    benign_answer_tokens: int = hp(8, "length of the model's own answers to those requests")
    constraint_pairs: int = hp(0, "knowledge pairs of other training records added to each record's locality pairs "
                                  "(beside its own)")
    meta_lr: float = hp(1e-6, "Adam learning rate of the editor network (MEND's lr)")
    lr_lr: float = hp(1e-4, "Adam learning rate of the learned per-weight edit rates (MEND's lr_lr)")
    steps: int = hp(1000, "meta-training optimiser steps at most (MEND's max_iters)")
    batch_records: int = hp(1, "records per optimiser step (each is its own edit; gradients averaged)")
    grad_clip: float = hp(100.0, "clip the editor's gradient norm to this (0: no clipping)")
    val_every: int = hp(100, "score the validation records every this many steps")
    patience: int = hp(5, "stop after this many validation scores without improvement (0: never stop early)")
    seed: int = hp(0, "seed of the editor's initialisation and of the record order")

    def __post_init__(self) -> None:
        self._check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        self._check(self.lr_scale > 0, f"lr_scale must be > 0, got {self.lr_scale}")
        self._check(len(self.layers) > 0, "layers: name at least one decoder layer")
        self._check(len(set(self.layers)) == len(self.layers), f"layers: duplicates in {self.layers}")
        self._check(all(isinstance(m, str) and m for m in self.modules), "modules: non-empty names")
        self._check(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")
        self._check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        self._check(self.n_hidden >= 0, f"n_hidden must be >= 0, got {self.n_hidden}")
        self._check(self.c_edit > 0, "c_edit must be > 0, or the editor learns nothing about the edit")
        self._check(self.c_loc >= 0, "c_loc must be >= 0")
        self._check(self.generalization_inputs >= 0, "generalization_inputs must be >= 0")
        self._check(self.benign_constraint >= 0, "benign_constraint must be >= 0")
        self._check(self.benign_answer_tokens >= 1, "benign_answer_tokens must be >= 1")
        self._check(self.constraint_pairs >= 0, "constraint_pairs must be >= 0")
        self._check(self.meta_lr > 0 and self.lr_lr >= 0, "meta_lr must be > 0 and lr_lr >= 0")
        self._check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        self._check(self.batch_records >= 1, f"batch_records must be >= 1, got {self.batch_records}")
        self._check(self.grad_clip >= 0, "grad_clip must be >= 0")
        self._check(self.val_every >= 1, f"val_every must be >= 1, got {self.val_every}")
        self._check(self.patience >= 0, "patience must be >= 0")

    @property
    def active_suffix(self) -> str | None:
        return self.suffix if self.use_suffix else None

    @property
    def eval_suffix(self) -> str | None:
        return self.active_suffix
