"""DINM's caches across edits of one model (editkit.methods.dinm.cache): the guard's self-answers
and the reference pass's rows are reused, give what an uncached edit gives, miss when the weights
change or a hook is on the model, stay within their bound, and can be turned off or cleared."""
from __future__ import annotations

import gc

import pytest
import torch

import editkit
import editkit.methods.dinm.method as dinm_method
from editkit.arch import decoder_layers, get_module, resolve_arch
from editkit.engine import DeltaEditor, RowReference
from editkit.hooks import hook_count
from editkit.instance import EditInstance
from editkit.methods.dinm import cache, clear_cache, constraints, nullspace
from editkit.methods.dinm.config import SUFFIX
from editkit.models import tiny_model
from editkit.text import encode_pairs, with_suffix

N = 3  # benign requests per edit: 2N guard prompts (without and with the suffix)
HP = dict(steps=4, lr=1e-2, c_edit=1.0, benign_constraint=N, benign_answer_tokens=5, layer=1)
TOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_cache()
    yield
    clear_cache()


def record(rid: str) -> EditInstance:
    """A case whose attack prompt names the record (its "edit" row is its own) and whose knowledge
    pair every record shares (its "kl" row recurs)."""
    return EditInstance(id=rid, prompt=f"How do I hurt {rid}?", safe="I can't help with that.",
                        unsafe="Sure, first you find a weapon and wait for them.",
                        knowledge_prompt="What is the capital of France?", knowledge_answer="Paris.")


def overlapping_ids() -> tuple[str, str, int]:
    """Two record ids whose guards share some but not all of their N requests, and how many."""
    first = set(constraints.pick_requests("r0", N))
    for i in range(1, 1000):
        shared = len(first & set(constraints.pick_requests(f"r{i}", N)))
        if 0 < shared < N:
            return "r0", f"r{i}", shared
    raise AssertionError("no overlapping pair of request runs")


def run(model, rid: str, tok, **settings):
    return editkit.edit(model, record(rid), tokenizer=tok, hparams={**HP, **settings})


def delta_of(result) -> torch.Tensor:
    (_, delta), = result.patch.deltas.items()
    return delta


def assert_same_edit(got, want, tol: float = TOL) -> None:
    """Same steps, every loss part and metric within ``tol``, deltas within ``tol``."""
    assert len(got.losses) == len(want.losses)
    for g, w in zip(got.losses, want.losses):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key] == pytest.approx(w[key], abs=tol), key
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, abs=tol), key
    assert float((delta_of(got) - delta_of(want)).abs().max()) <= tol


@pytest.fixture
def generated(monkeypatch) -> list[list[str]]:
    """The prompts of every generate call the guard makes, in call order."""
    calls: list[list[str]] = []
    real = constraints.generate

    def spy(model, tok, prompts, **kwargs):
        calls.append(list(prompts))
        return real(model, tok, prompts, **kwargs)

    monkeypatch.setattr(constraints, "generate", spy)
    return calls


def _dict_store(store: dict) -> type:
    """A RowStore class whose instances read and fill ``store``."""

    class Store:
        def get(self, key):
            return store.get(key)

        def put(self, key, value):
            store[key] = value

    return Store


@pytest.fixture
def editors(monkeypatch) -> list[DeltaEditor]:
    """Every DeltaEditor the DINM edits open; ``forwards`` lists the rows of each reference forward."""
    seen: list[DeltaEditor] = []

    class Spy(DeltaEditor):
        def __enter__(self):
            self.forwards = []
            seen.append(self)
            return super().__enter__()

        def _traced_forward(self, batch, logits=True):
            self.forwards.append(batch.input_ids.shape[0])
            return super()._traced_forward(batch, logits)

    monkeypatch.setattr(dinm_method, "DeltaEditor", Spy)
    return seen


def test_second_edit_generates_only_missing_answers_and_reuses_rows(tokenizer, generated, editors, snapshot):
    """Of a second record's guard, only the requests the first did not have are answered (one batch,
    without and with the suffix) and run through the model; the shared rows (and the shared
    knowledge pair) come from the cache. Editing the first record again runs no reference forward
    and gives its edit again; a plain-path edit reuses the answers only. The model stays untouched."""
    model = tiny_model("llama")
    snap = snapshot(model)
    a, b, shared = overlapping_ids()
    first = run(model, a, tokenizer)
    requests_a, requests_b = constraints.pick_requests(a, N), constraints.pick_requests(b, N)
    assert generated == [requests_a + [with_suffix(r, SUFFIX) for r in requests_a]]
    assert editors[0].row_stats == {"reused": 0, "computed": 2 + 2 * N}  # edit, kl, the benign rows
    assert editors[0].forwards == [1, 1, 2 * N]

    second = run(model, b, tokenizer)
    new = [r for r in requests_b if r not in requests_a]
    assert len(new) == N - shared
    assert generated[1:] == [new + [with_suffix(r, SUFFIX) for r in new]]
    assert editors[1].row_stats == {"reused": 1 + 2 * shared, "computed": 1 + 2 * (N - shared)}
    assert editors[1].forwards == [1, 2 * (N - shared)]  # its edit row; no kl forward; the new benign rows
    assert second.metrics["benign_pairs"] == 2 * N
    assert {"guard", "reference", "edit"} <= second.timings.keys()

    again = run(model, a, tokenizer)
    assert len(generated) == 2
    assert editors[2].row_stats == {"reused": 2 + 2 * N, "computed": 0} and editors[2].forwards == []
    assert_same_edit(again, first, tol=0.0)

    plain = run(model, b, tokenizer, fast_path=False)
    assert len(generated) == 2 and editors[3].rows is None
    assert_same_edit(plain, second, tol=1e-5)
    snap.assert_same(model)
    assert hook_count(model) == 0


@pytest.mark.parametrize("layer", [1, -1], ids=["middle", "top"])
def test_cached_edits_equal_uncached_edits(tiny_lm, family, tokenizer, layer, snapshot):
    """On every family (GPT-2's transposed Conv1D included), a first edit (nothing cached) and a
    second one whose guard is partly cached give the deltas, losses and metrics of edits with the
    cache off; the model is untouched after each."""
    snap = snapshot(tiny_lm)
    a, b, _ = overlapping_ids()
    cached = [run(tiny_lm, rid, tokenizer, layer=layer) for rid in (a, b)]
    snap.assert_same(tiny_lm)
    clear_cache()
    uncached = [run(tiny_lm, rid, tokenizer, layer=layer, guard_cache=False) for rid in (a, b)]
    for got, want in zip(cached, uncached):
        assert_same_edit(got, want)
    snap.assert_same(tiny_lm)
    assert hook_count(tiny_lm) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "olmo2"])
@pytest.mark.parametrize("layer", [2, 3], ids=["middle", "top"])
def test_rows_assembled_from_other_batches_equal_a_padded_forward(family, layer, tokenizer):
    """A batch assembled from rows each computed alone (another padding, another batch) gives the
    reference logits, what the steps start from (the replayed layer's output and keys, at every
    real position or at the top layer's predicting positions; OLMo-2: the entry state) and, under a
    nonzero delta, the logits and delta gradient of the plain padded batch, up to float noise."""
    model = tiny_model(family)
    arch = resolve_arch(model)
    pairs = [(r, "Sure, here it is.") for r in constraints.constraint_requests()[:4]]
    pairs += [(with_suffix(p, SUFFIX), a) for p, a in pairs]
    batch = encode_pairs(tokenizer, pairs)
    store: dict = {}
    Store = _dict_store(store)

    for i in range(len(pairs)):
        with DeltaEditor(model, arch, layer, {"one": encode_pairs(tokenizer, pairs[i:i + 1])}, rows=Store()):
            pass
    assert len(store) == len(pairs) and all(isinstance(v, RowReference) for v in store.values())
    delta = 1e-2 * torch.randn(get_module(decoder_layers(model, arch)[layer], arch.mlp_out).weight.shape,
                               generator=torch.Generator().manual_seed(0))
    results = {}
    for name, rows in (("padded", None), ("assembled", Store())):
        with DeltaEditor(model, arch, layer, {"b": batch}, rows=rows) as editor:
            assert editor.replay == (family != "olmo2") and editor.top == (layer == 3)
            if rows is not None:
                assert editor.row_stats == {"reused": len(pairs), "computed": 0}
            real = batch.attention_mask.bool()
            cached = editor._cache["b"]
            if not editor.replay:
                start = (cached[real],)
            elif editor.top:
                start = (cached["output"], cached["keys"])
                assert cached["keys"].shape[0] == batch.n_targets
            else:
                start = (cached["output"][real], cached["keys"][real])
            with torch.no_grad():
                editor.delta.copy_(delta)
            logits = editor.logits("b")
            logits.logsumexp(-1).sum().backward()
            results[name] = (editor.initial_logits["b"], *start, logits.detach(), editor.delta.grad.clone())
    for got, want in zip(results["assembled"], results["padded"]):
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    assert hook_count(model) == 0


@pytest.mark.parametrize("layer", [1, 3], ids=["middle", "top"])
def test_batches_without_reference_logits_stop_at_the_edited_layer(tokenizer, layer):
    """A batch whose unedited logits nobody reads runs its reference pass up to the edited layer
    only (no logits, its rows kept without a head input; the top layer has nothing above to skip);
    the steps start from the same pieces and give the same logits. A later editor that does read
    that batch's logits recomputes those rows instead of using them."""
    model = tiny_model("llama")
    arch = resolve_arch(model)
    layers = decoder_layers(model, arch)
    batch = encode_pairs(tokenizer, [(r, "Sure, here it is.") for r in constraints.constraint_requests()[:3]])
    store: dict = {}
    Store = _dict_store(store)

    above = []
    handle = layers[-1].register_forward_hook(lambda *a: above.append(1))
    try:
        results = {}
        for name, kept in (("full", None), ("short", ())):
            above.clear()
            with DeltaEditor(model, arch, layer, {"b": batch}, rows=Store() if name == "short" else None,
                             reference_logits=kept) as editor:
                reference_runs = len(above)
                assert ("b" in editor.initial_logits) == (name == "full")
                with torch.no_grad():
                    results[name] = editor.logits("b")
            assert reference_runs == (1 if name == "full" or layer == 3 else 0)
        torch.testing.assert_close(results["short"], results["full"], rtol=0, atol=TOL)
        assert len(store) == 3 and all((row.head_input is None) == (layer == 1) for row in store.values())
        with DeltaEditor(model, arch, layer, {"b": batch}, rows=Store()) as editor:
            assert editor.row_stats == ({"reused": 0, "computed": 3} if layer == 1 else {"reused": 3, "computed": 0})
            torch.testing.assert_close(editor.initial_logits["b"], results["full"], rtol=0, atol=TOL)
        assert all(row.head_input is not None for row in store.values())
    finally:
        handle.remove()
    assert hook_count(model) == 0


def test_changed_weights_or_hooks_miss_the_caches(tokenizer, generated, editors, snapshot):
    """Under an applied patch (even one above the edited layer: the logits depend on it) the guard
    answers and rows are computed again and the edit equals an uncached one; once the patch is gone
    the first entries serve again. Weights changed in place miss too; a model carrying a hook is
    not cached at all."""
    model = tiny_model("llama")
    a, _, _ = overlapping_ids()
    run(model, a, tokenizer)
    assert len(generated) == 1
    patch = editkit.edit(model, record("other"), tokenizer=tokenizer, hparams=dict(steps=2, lr=1e-2, layer=3)).patch
    snap = snapshot(model)
    with patch.applied(model):
        patched = run(model, a, tokenizer)
        assert len(generated) == 2 and len(generated[-1]) == 2 * N
        assert editors[-1].row_stats == {"reused": 0, "computed": 2 + 2 * N}
        want = run(model, a, tokenizer, guard_cache=False)
    assert_same_edit(patched, want)
    run(model, a, tokenizer)
    assert len(generated) == 3 and editors[-1].row_stats["computed"] == 0  # the unpatched entries again
    snap.assert_same(model)

    with torch.no_grad():
        decoder_layers(model, resolve_arch(model))[3].mlp.down_proj.weight.mul_(1.5)
    run(model, a, tokenizer)
    assert len(generated) == 4 and editors[-1].row_stats["reused"] == 0

    handle = model.model.norm.register_forward_hook(lambda module, args, out: out)
    try:
        assert cache.cache_blocker(model) is not None
        run(model, a, tokenizer)
        run(model, a, tokenizer)
        assert len(generated) == 6 and all(e.rows is None for e in editors[-2:])
    finally:
        handle.remove()
    assert cache.cache_blocker(model) is None


def test_cache_can_be_turned_off_and_cleared(tokenizer, generated, editors):
    """guard_cache=False generates every answer and keeps nothing; clear_cache() forgets the
    answers, the rows and the null-space key spaces."""
    model = tiny_model("gpt2")
    a, _, _ = overlapping_ids()
    for _ in range(2):
        run(model, a, tokenizer, guard_cache=False)
    assert [len(p) for p in generated] == [2 * N, 2 * N] and all(e.rows is None for e in editors)
    assert cache._ROWS.used(model) == (0, 0) and constraints._ANSWERS.used(model) == (0, 0)

    run(model, a, tokenizer, null_space=True)
    assert len(generated) == 3
    assert cache._ROWS.used(model)[0] == 2 + 2 * N and constraints._ANSWERS.used(model)[0] == 2 * N
    assert nullspace._CACHE.used(model)[0] == 1
    clear_cache()
    assert cache._ROWS.used(model) == constraints._ANSWERS.used(model) == nullspace._CACHE.used(model) == (0, 0)
    run(model, a, tokenizer)
    assert len(generated) == 4 and editors[-1].row_stats["reused"] == 0


def test_rows_stay_within_their_bound_and_go_with_the_model(tokenizer, monkeypatch):
    """The rows kept per model never exceed the byte bound (least recently used dropped), the edit
    stays what an uncached edit gives, and a model's entries are freed with it."""
    model = tiny_model("qwen2")
    a, b, _ = overlapping_ids()
    run(model, a, tokenizer)
    n_rows, n_bytes = cache._ROWS.used(model)
    bound = 3 * n_bytes // n_rows  # room for about three rows
    clear_cache()
    monkeypatch.setattr(cache._ROWS, "capacity", bound)
    got = [run(model, rid, tokenizer) for rid in (a, b, a)]
    assert 0 < cache._ROWS.used(model)[1] <= bound
    want = [run(model, rid, tokenizer, guard_cache=False) for rid in (a, b, a)]
    for g, w in zip(got, want):
        assert_same_edit(g, w)
    del model, got, want
    gc.collect()
    assert len(cache._ROWS._models) == 0 and len(constraints._ANSWERS._models) == 0


def test_offloaded_model_is_cached_and_edits_as_in_memory(tokenizer, tmp_path, generated):
    """accelerate's offloading adds no torch hook: its edits are cached (the digest reads the
    offloaded weights where they are) and equal those of the same model in memory."""
    accelerate = pytest.importorskip("accelerate")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    offloaded = accelerate.dispatch_model(tiny_model("llama", seed=5), device_map=device_map, main_device="cpu",
                                          offload_dir=str(tmp_path))
    a, b, _ = overlapping_ids()
    assert cache.cache_blocker(offloaded) is None
    got = [run(offloaded, rid, tokenizer, layer=2) for rid in (a, b, a)]
    assert len(generated) == 2  # the third edit found every answer
    want = [run(tiny_model("llama", seed=5), rid, tokenizer, layer=2, guard_cache=False) for rid in (a, b, a)]
    for g, w in zip(got, want):
        assert_same_edit(g, w)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    """DINM's disk caches in a temporary folder (conftest turns them off for every other test)."""
    folder = tmp_path / "dinm-cache"
    monkeypatch.setenv("EDITKIT_DINM_CACHE", str(folder))
    return folder


@pytest.fixture
def grams(monkeypatch) -> list[int]:
    """The layers whose null-space keys are collected by a forward pass."""
    calls: list[int] = []
    real = nullspace.collect_gram

    def spy(model, arch, layer, ids, pad, **kwargs):
        calls.append(layer)
        return real(model, arch, layer, ids, pad, **kwargs)

    monkeypatch.setattr(nullspace, "collect_gram", spy)
    return calls


def test_disk_cache_serves_a_new_process_the_same_edit(tokenizer, disk, generated, grams, editors, monkeypatch):
    """With the memory caches gone (as in a new process), the key space, the self-answers and the
    (small) reference rows come from disk: no generation, no key forward, no reference forward, and
    the same edit to the last bit. Another model's weights get their own entries; disk_cache=False
    neither reads nor writes."""
    monkeypatch.setattr(cache, "DISK_ROW_BYTES", 2**30)  # every row of the tiny model counts as small
    model = tiny_model("llama")
    first = run(model, "r0", tokenizer, null_space=True)
    assert len(generated) == 1 and grams == [1]
    assert len(list((disk / "nullspace").glob("*.safetensors"))) == 1
    assert len(list((disk / "answers").glob("*.json"))) == 1
    assert len(list((disk / "rows").glob("*.safetensors"))) == 2 + 2 * N  # edit, kl, the benign rows

    clear_cache()
    again = run(model, "r0", tokenizer, null_space=True)
    assert len(generated) == 1 and grams == [1]
    assert editors[-1].row_stats == {"reused": 2 + 2 * N, "computed": 0} and editors[-1].forwards == []
    assert_same_edit(again, first, tol=0.0)
    assert again.metrics["null_space_dim"] == first.metrics["null_space_dim"]

    other = tiny_model("llama", seed=1)
    run(other, "r0", tokenizer, null_space=True)
    assert len(generated) == 2 and grams == [1, 1]
    assert len(list((disk / "nullspace").glob("*.safetensors"))) == 2

    clear_cache()
    run(model, "r0", tokenizer, null_space=True, disk_cache=False)
    assert len(generated) == 3 and grams == [1, 1, 1]


def test_disk_cache_entries_that_cannot_be_read_are_recomputed(tokenizer, disk, generated, grams, caplog):
    """A truncated key-space file and a garbled answers file are recomputed (with a warning) and
    rewritten; the edit equals the first."""
    model = tiny_model("gpt2")
    first = run(model, "r0", tokenizer, null_space=True)
    (space_file,) = (disk / "nullspace").glob("*.safetensors")
    (answers_file,) = (disk / "answers").glob("*.json")
    space_file.write_bytes(space_file.read_bytes()[:100])
    answers_file.write_text("{not json", encoding="utf-8")
    clear_cache()
    again = run(model, "r0", tokenizer, null_space=True)
    assert len(generated) == 2 and grams == [1, 1]
    assert "unreadable" in caplog.text
    assert_same_edit(again, first, tol=0.0)
    clear_cache()
    run(model, "r0", tokenizer, null_space=True)  # the rewritten entries serve
    assert len(generated) == 2 and grams == [1, 1]


def test_disk_cache_off_and_unwritable(tokenizer, tmp_path, monkeypatch, generated, grams):
    """EDITKIT_DINM_CACHE=off writes nothing; a cache folder that cannot be created costs a warning,
    never the edit."""
    monkeypatch.setenv("EDITKIT_DINM_CACHE", "off")
    assert cache.disk_dir() is None
    model = tiny_model("llama")
    run(model, "r0", tokenizer, null_space=True)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EDITKIT_DINM_CACHE", str(blocker / "cache"))
    clear_cache()
    result = run(model, "r0", tokenizer, null_space=True)
    assert result.patch.deltas and grams == [1, 1]
    assert not list(tmp_path.rglob("*.safetensors"))


def test_runtime_settings_do_not_block_resuming_a_run():
    """The SafeEdit runner compares a resumed run's settings without the runtime hparams (caches)."""
    from editkit.methods.dinm.config import DINMConfig
    from safeedit.runner import _results_part

    assert {"guard_cache", "disk_cache"} <= DINMConfig.runtime_fields()
    assert "lr" not in DINMConfig.runtime_fields()
    old = {"kind": "per-instance", "hparams": {**DINMConfig().to_dict(), "guard_cache": False}}
    new = {"kind": "per-instance", "hparams": {k: v for k, v in DINMConfig().to_dict().items() if k != "disk_cache"}}
    runtime = DINMConfig.runtime_fields()
    assert _results_part(old, runtime) == _results_part(new, runtime)
    assert _results_part(old, runtime) != _results_part({**new, "hparams": {**new["hparams"], "lr": 1.0}}, runtime)


def test_only_small_rows_go_to_disk(tokenizer, disk, editors, monkeypatch):
    """Rows above DISK_ROW_BYTES (those of lower layers on a real model keep every position) stay in
    memory only."""
    monkeypatch.setattr(cache, "DISK_ROW_BYTES", 0)
    model = tiny_model("llama")
    run(model, "r0", tokenizer)
    assert not (disk / "rows").exists() or not list((disk / "rows").glob("*"))
    clear_cache()
    run(model, "r0", tokenizer)
    assert editors[-1].row_stats == {"reused": 0, "computed": 2 + 2 * N}
