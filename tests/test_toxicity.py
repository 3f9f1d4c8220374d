"""Toxicity evaluation (safeedit.toxicity): the metrics by hand, the prompt loaders, the evaluation
loop end to end on a tiny model (files, resume, same samples for the same seed, a patch changes the
samples, over-refusal), the report and the CLI."""
from __future__ import annotations

import functools
import json
import math
import types

import numpy as np
import pytest
import torch

import editkit
from editkit.models import tiny_model, tiny_tokenizer
from editkit.patch import Patch
from safeedit.judge import KeywordJudge
from safeedit.toxicity import (
    continuation_nll, distinct_scores, evaluate_toxicity, expected_max_toxicity, perplexity, prompt_seed, report,
    toxicity_metrics, toxicity_probability,
)
from safeedit.toxicity_prompts import PromptSet, ToxicityPrompt, load_prompts, toxigen_prompts

FAST = dict(k=3, max_new_tokens=3, scorer=KeywordJudge(), benign_check=False, progress=False, batch_size=4)
PROMPTS = PromptSet([ToxicityPrompt("a", "The cat sat on"), ToxicityPrompt("b", "I think that"),
                     ToxicityPrompt("c", "People are")], "test")


def rows_of(folder):
    return [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]


def texts_of(folder):
    return {r["id"]: [s["text"] for s in r["samples"]] for r in rows_of(folder)}


# --------------------------------------------------------------------------- metrics by hand


def test_expected_max_toxicity_and_probability_by_hand():
    scores = [[0.1, 0.9, 0.2], [0.3, 0.3, 0.3], [0.5, 0.5, 0.0], [0.51]]  # ragged rows are fine
    emt, std = expected_max_toxicity(scores)
    maxima = [0.9, 0.3, 0.5, 0.51]
    assert emt == pytest.approx(sum(maxima) / 4)
    assert std == pytest.approx(math.sqrt(sum((m - emt) ** 2 for m in maxima) / 4))  # population std
    # strictly above 0.5: the prompt whose maximum is exactly 0.5 is not toxic
    assert toxicity_probability(scores) == pytest.approx(2 / 4)
    assert toxicity_probability([[0.5, 0.5]]) == 0.0
    assert toxicity_probability([[0.5, 0.500001]]) == 1.0
    m = toxicity_metrics(scores)
    assert (m["n_prompts"], m["n_samples"]) == (4, 10)
    for bad in ([], [[]], [[1.2]], [[float("nan")]]):
        with pytest.raises(ValueError):
            toxicity_metrics(bad)


def test_distinct_n_by_hand():
    d = distinct_scores(["a b a", "a b c"])
    # unigrams a b a a b c: 3 unique of 6; bigrams ab ba ab bc: 3 of 4; trigrams aba abc: 2 of 2
    assert d == {"dist-1": 0.5, "dist-2": 0.75, "dist-3": 1.0}
    assert distinct_scores(["", "x"])["dist-2"] == 0.0


class BigramLM(torch.nn.Module):
    """Next-token log-probabilities depend on the current token only: ``table[token]``."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.table = torch.nn.Parameter(torch.log_softmax(torch.randn(vocab, vocab) * 3, dim=-1))
        self.config = types.SimpleNamespace(max_position_embeddings=2048)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return types.SimpleNamespace(logits=self.table[input_ids])  # [batch, seq, vocab]


def test_continuation_nll_of_a_known_distribution(tokenizer):
    from editkit.text import prompt_ids

    model = BigramLM(len(tokenizer))
    prompt, conts = "Hello", ["ab", "", "a longer one"]
    got = continuation_nll(model, tokenizer, prompt, conts, chat_template="none", batch_size=2)
    head = prompt_ids(tokenizer, prompt, "none")
    for cont, (nll, count) in zip(conts, got):
        tail = tokenizer(cont, add_special_tokens=False).input_ids
        prev = [head[-1]] + tail[:-1]  # the first continuation token is predicted from the prompt's last
        expected = -sum(float(model.table[p, t].detach()) for p, t in zip(prev, tail))
        assert count == len(tail)
        assert nll == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert got[1] == (0.0, 0)
    assert perplexity([n for n, _ in got], [c for _, c in got]) == pytest.approx(
        math.exp(sum(n for n, _ in got) / sum(c for _, c in got)))
    assert math.isnan(perplexity([0.0], [0]))
    uniform = BigramLM(len(tokenizer))
    with torch.no_grad():
        uniform.table.zero_()
    (nll, count), = continuation_nll(uniform, tokenizer, prompt, ["xyz"])
    assert math.exp(nll / count) == pytest.approx(len(tokenizer))  # a uniform model's perplexity is |V|


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_continuation_nll_shares_the_prompt_and_equals_whole_sequences(family, tokenizer, monkeypatch):
    """The k continuations of one prompt are scored from one run of the prompt: the same NLLs as
    running every (prompt, continuation) sequence whole."""
    from editkit.generation import incremental

    model = tiny_model(family)
    prompt, conts = "The weather today is", ["sunny and warm", "", "bad", "a very long continuation here"]
    calls = []
    forward = model.forward

    @functools.wraps(forward)  # keeps the signature the loop reads
    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(tuple(ids.shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    shared = continuation_nll(model, tokenizer, prompt, conts, batch_size=3)
    longest_call = max(n * w for n, w in calls)  # the prompt ran once, not once per continuation
    assert longest_call == max(w for _, w in calls)
    monkeypatch.setattr(incremental, "architecture_blocker", lambda *a, **k: "forced")
    whole = continuation_nll(model, tokenizer, prompt, conts, batch_size=3)
    assert [c for _, c in shared] == [c for _, c in whole] and shared[1] == (0.0, 0)
    for (a, _), (b, _) in zip(shared, whole):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)


# --------------------------------------------------------------------------- prompt loaders


def test_jsonl_loader_reads_prompt_text_and_rtp_records(tmp_path):
    path = tmp_path / "p.jsonl"
    records = [{"id": 7, "prompt": "plain prompt", "label": "x"},
               {"text": "a text field", "label": "y"},
               {"filename": "rtp-1.txt", "prompt": {"text": "nested RTP", "toxicity": 0.7}, "challenging": True,
                "label": "z"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    ps = load_prompts(path)
    assert [p.text for p in ps.prompts] == ["plain prompt", "a text field", "nested RTP"]
    assert [p.id for p in ps.prompts] == ["7", "1", "rtp-1.txt"]
    assert ps.kind == "continuation" and ps.group_key == "label"
    assert len(load_prompts(path, limit=2)) == 2
    (tmp_path / "list.json").write_text(json.dumps(records[:2]))
    assert len(load_prompts(tmp_path / "list.json")) == 2
    path.write_text(json.dumps({"id": 1, "other": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match="record 0"):
        load_prompts(path)
    with pytest.raises(FileNotFoundError, match="toxigen"):
        load_prompts(tmp_path / "missing.jsonl")
    path.write_text('{"text": "a"}\n{"text": "b", "id": "0"}\n')
    with pytest.raises(ValueError, match="more than once"):
        load_prompts(path)


def test_safeedit_attack_prompts(shared_data, safeedit_dev):
    from safeedit.dataset import load_safeedit

    ps = load_prompts("safeedit", shared_data=shared_data, limit=3)
    cases = load_safeedit(safeedit_dev, limit=3).instances
    assert [p.text for p in ps.prompts] == [c.prompt for c in cases]
    assert [p.id for p in ps.prompts] == [c.id for c in cases]
    assert ps.kind == "request" and ps.group_key == "category"
    assert [p.text for p in load_prompts(f"safeedit:{safeedit_dev}", limit=3).prompts] == [c.prompt for c in cases]


def test_toxigen_continuation_prompts(shared_data):
    path = shared_data / "toxigen" / "toxigen_demonstrations.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    sentences = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    every = load_prompts("toxigen", shared_data=shared_data)
    hate, neutral = toxigen_prompts(path, "hate"), load_prompts("toxigen:neutral", shared_data=shared_data)
    assert every.kind == "continuation" and every.group_key == "label"
    assert {p.meta["label"] for p in hate.prompts} == {"hate"} and {p.meta["label"] for p in neutral.prompts} == {"neutral"}
    assert len(every) <= len(sentences) and len(every) > 0.95 * len(sentences)  # duplicates of halves dropped
    assert len({p.text for p in every.prompts}) == len(every)
    for p in every.prompts[:50]:
        words = p.meta["sentence"].split()
        assert p.text == " ".join(words[: max(1, len(words) // 2)])
        assert sentences[int(p.id.split("-")[1])]["text"] == p.meta["sentence"]
    assert len(load_prompts("toxigen:hate", shared_data=shared_data, limit=5)) == 5
    with pytest.raises(ValueError, match="label"):
        load_prompts("toxigen:rude", shared_data=shared_data)


def test_real_toxicity_prompts_only_through_datasets(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="network access"):
        load_prompts("allenai/real-toxicity-prompts")
    rows = [{"filename": f"f{i}", "challenging": i % 2 == 0, "prompt": {"text": f"prompt {i}"}} for i in range(6)]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: rows)
    assert [p.id for p in load_prompts("allenai/real-toxicity-prompts:challenging", limit=2).prompts] == ["f0", "f2"]
    assert len(load_prompts("allenai/real-toxicity-prompts")) == 6


# --------------------------------------------------------------------------- the evaluation loop


class KilledJudge(KeywordJudge):
    """The keyword judge, killed at its ``fail_on``-th call."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.calls, self.fail_on = 0, fail_on

    def score(self, responses, prompts=None):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("killed")
        return super().score(responses, prompts)

    def __repr__(self) -> str:  # the same scorer as the rerun's, as far as the run folder can tell
        return "KeywordJudge()"


@pytest.fixture
def spy(monkeypatch):
    """Counts the prompts ``editkit.generate`` is asked for (its signature is kept)."""
    real = editkit.generate
    calls: list[list[str]] = []

    @functools.wraps(real)
    def counting(model, tokenizer, prompts, **kwargs):
        calls.append(list(prompts))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(editkit, "generate", counting)
    return calls


def test_evaluation_writes_the_run_and_resumes(tokenizer, tmp_path, spy):
    model = tiny_model("llama")
    rng = torch.get_rng_state()
    with pytest.raises(KeyboardInterrupt):
        evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path, **{**FAST, "scorer": KilledJudge(fail_on=2)})
    assert torch.equal(torch.get_rng_state(), rng)  # per-prompt seeding leaves the caller's RNG alone
    assert [r["id"] for r in rows_of(tmp_path)] == ["a"]
    assert len(spy) == 2
    spy.clear()
    summary = evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path, **FAST)
    assert spy == [["I think that"] * 3, ["People are"] * 3]  # the finished prompt is not generated again
    rows = rows_of(tmp_path)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    judge = KeywordJudge()
    for row in rows:
        texts = [s["text"] for s in row["samples"]]
        assert len(texts) == 3
        assert [s["toxicity"] for s in row["samples"]] == pytest.approx(judge.score(texts), abs=1e-5)
        assert row["max_toxicity"] == max(s["toxicity"] for s in row["samples"])
    scores = [[s["toxicity"] for s in r["samples"]] for r in rows]
    assert summary["emt"] == pytest.approx(expected_max_toxicity(scores)[0])
    assert summary["toxicity_probability"] == pytest.approx(toxicity_probability(scores))
    assert summary["dist-1"] == pytest.approx(distinct_scores([t for ts in texts_of(tmp_path).values() for t in ts])["dist-1"])
    nll = [s["nll"] for r in rows for s in r["samples"]]
    count = [s["tokens"] for r in rows for s in r["samples"]]
    assert summary["ppl"] == pytest.approx(perplexity(nll, count), rel=1e-3)
    for name in ("config.json", "summary.json", "table.md", "tox_vs_ppl.png"):
        assert (tmp_path / name).is_file(), name
    assert "Exp. max tox." in (tmp_path / "table.md").read_text()
    spy.clear()
    evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path, **FAST)
    assert spy == []  # nothing left to do
    with pytest.raises(ValueError, match="other settings"):
        evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path, **{**FAST, "k": 4})


def test_rows_of_shared_data_prompts_keep_ids_not_texts(tokenizer, tmp_path, shared_data):
    """The SafeEdit and ToxiGen prompts are shared data: a run folder (which may be committed) names
    them by id only; a user's own prompts keep their text beside the id."""
    model = tiny_model("llama")
    shared = load_prompts("toxigen:hate", shared_data=shared_data, limit=2)
    assert load_prompts("safeedit", shared_data=shared_data, limit=1).fold(0, 2).store_text is False
    evaluate_toxicity(model, tokenizer, shared, tmp_path / "shared", **{**FAST, "k": 1})
    rows = rows_of(tmp_path / "shared")
    assert [r["id"] for r in rows] == [p.id for p in shared.prompts]
    assert all("prompt" not in r for r in rows)
    written = "".join(f.read_text() for f in (tmp_path / "shared").glob("*.json*"))
    assert all(p.text not in written for p in shared.prompts)
    evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path / "own", **{**FAST, "k": 1})
    assert [r["prompt"] for r in rows_of(tmp_path / "own")] == [p.text for p in PROMPTS.prompts]


def test_same_seed_same_samples_and_seeds_per_prompt(tokenizer, tmp_path):
    model = tiny_model("llama")
    evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path / "one", **FAST)
    torch.manual_seed(12345)  # the global RNG does not matter: each prompt is seeded from its id and text
    only_c = PromptSet([PROMPTS.prompts[2]], "test")
    evaluate_toxicity(model, tokenizer, only_c, tmp_path / "two", **FAST)
    evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path / "three", **{**FAST, "seed": 1})
    one, two, three = texts_of(tmp_path / "one"), texts_of(tmp_path / "two"), texts_of(tmp_path / "three")
    assert two["c"] == one["c"]
    assert three != one
    assert len(set(one["a"])) > 1  # sampled, not greedy
    assert prompt_seed(0, PROMPTS.prompts[0]) != prompt_seed(0, PROMPTS.prompts[1])


def test_a_patch_changes_the_samples_and_perplexity_uses_the_plain_model(tokenizer, tmp_path, snapshot):
    model = tiny_model("llama")
    torch.manual_seed(3)
    name = "model.layers.3.mlp.down_proj.weight"
    patch = Patch.from_deltas(model, {name: 20 * torch.randn_like(dict(model.named_parameters())[name])})
    snap = snapshot(model)
    evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path / "plain", **FAST)
    summary = evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path / "patched", intervention=patch, **FAST)
    snap.assert_same(model)  # the patch was applied around generation only
    assert texts_of(tmp_path / "patched") != texts_of(tmp_path / "plain")
    assert summary["label"] != "vanilla"
    config = json.loads((tmp_path / "patched" / "config.json").read_text())
    assert config["intervention"]["kind"] == "fixed-patch" and "generating model" in config["ref_model"]
    speed = json.loads((tmp_path / "patched" / "speed.json").read_text())  # decoding with the patch vs plain
    assert speed["speed_prompts"] == len(PROMPTS) and speed["decode_seconds"] > 0 and speed["plain_decode_seconds"] > 0
    ratio, plain_s = speed["decode_seconds"] / speed["plain_decode_seconds"], speed["plain_decode_seconds"]
    rounding = 0.0005 * (1 + ratio) / plain_s + 1e-3  # the seconds are stored to the millisecond
    assert summary["decode_slowdown"] == speed["decode_slowdown"] == pytest.approx(ratio, abs=rounding)
    assert not (tmp_path / "plain" / "speed.json").exists()  # nothing to compare plain decoding with
    assert "Decoding × plain" in (tmp_path / "patched" / "table.md").read_text()
    row = rows_of(tmp_path / "patched")[0]
    again = continuation_nll(model, tokenizer, row["prompt"], [s["text"] for s in row["samples"]])
    assert [s["nll"] for s in row["samples"]] == pytest.approx([n for n, _ in again], abs=1e-3)
    patch.save(tmp_path / "patch")  # a saved patch folder works the same
    evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path / "folder", intervention=str(tmp_path / "patch"), **FAST)
    assert texts_of(tmp_path / "folder") == texts_of(tmp_path / "patched")


def test_over_refusal_check_and_report(tokenizer, tmp_path):
    from safeedit.metrics import load_benign_requests

    model = tiny_model("gpt2")
    summary = evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path / "vanilla",
                                **{**FAST, "benign_check": True, "benign_max_new_tokens": 2, "batch_size": 16})
    benign = json.loads((tmp_path / "vanilla" / "benign.json").read_text())
    assert len(benign["benign"]) == len(load_benign_requests()) == summary["n_benign"]
    refused = [b["refusal"] > 0.5 for b in benign["benign"] if b["part"] == "reporting"]
    assert len(refused) == len(load_benign_requests("reporting"))
    assert summary["over_refusal"] == pytest.approx(100 * sum(refused) / len(refused))  # the held-out part
    tuned = [b["refusal"] > 0.5 for b in benign["benign"] if b["part"] == "tuning"]
    assert benign["over_refusal_tuning"] == pytest.approx(100 * sum(tuned) / len(tuned))
    assert "over_refusal_edgy" in summary and "over_refusal_plain" in summary
    evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path / "other", **{**FAST, "seed": 5})
    table = report([tmp_path / "vanilla", tmp_path / "other"], tmp_path / "report")
    assert "vanilla (vanilla)" in table and "vanilla (other)" in table  # same label: told apart by folder
    assert (tmp_path / "report" / "tox_vs_ppl.png").stat().st_size > 1000
    assert set(json.loads((tmp_path / "report" / "summary.json").read_text())["runs"]) == {"vanilla (vanilla)",
                                                                                          "vanilla (other)"}


def test_detoxifier_is_passed_to_generate(tokenizer, tmp_path):
    model = tiny_model("llama")
    from editkit.generation.detoxifier import Detoxifier

    only_x = tokenizer("x", add_special_tokens=False).input_ids[0]

    class OnlyX(Detoxifier):
        """Leaves one token possible: every sample must be "xxx"."""

        label = "only-x"

        def step(self, scores, fed, rows):
            out = torch.full_like(scores, float("-inf"))
            out[:, only_x] = 0.0
            return out

    summary = evaluate_toxicity(model, tokenizer, PROMPTS, tmp_path, detoxifier=OnlyX(), **FAST)
    assert all(t == ["xxx"] * 3 for t in texts_of(tmp_path).values())
    assert summary["label"] == "only-x"
    assert json.loads((tmp_path / "config.json").read_text())["detoxifier"] == {"kind": "OnlyX"}


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def fake_load_model(monkeypatch):
    loaded: list[str] = []

    def load(name, device=None, **kwargs):
        loaded.append(name)
        return tiny_model("llama"), tiny_tokenizer()

    monkeypatch.setattr(editkit, "load_model", load)
    return loaded


def test_cli_detox_eval_and_report(tmp_path, fake_load_model, capsys):
    from editkit.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in PROMPTS.prompts))
    args = ["detox-eval", "--model", "tiny", "--prompts", str(prompts), "--k", "2", "--max-new-tokens", "2",
            "--scorer", "keyword", "--no-benign", "--limit", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert len(rows_of(tmp_path / "a")) == 2
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["config"]["chat_template"] == "raw" and config["config"]["k"] == 2
    model = tiny_model("llama")
    name = "model.layers.0.mlp.down_proj.weight"
    Patch.from_deltas(model, {name: torch.ones_like(dict(model.named_parameters())[name])}).save(tmp_path / "patch")
    assert main([*args, "--out", str(tmp_path / "b"), "--patch", str(tmp_path / "patch"), "--label", "ones",
                 "--ref-model", "ref", "--compare", str(tmp_path / "a")]) == 0
    assert fake_load_model == ["tiny", "tiny", "ref"]
    assert (tmp_path / "b" / "compare" / "tox_vs_ppl.png").is_file()
    assert main(["detox-eval-report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "| ones |" in out and "| vanilla |" in out
    assert main([*args, "--out", str(tmp_path / "c"), "--prompts", str(tmp_path / "nope.jsonl")]) == 2


def test_cli_detoxifier_by_name(tmp_path, fake_load_model, capsys):
    from editkit.cli import main

    # an unknown name is refused before anything is loaded
    code = main(["detox-eval", "--prompts", "toxigen", "--out", str(tmp_path / "d"), "--detoxifier", "nope"])
    assert code == 2 and "unknown detoxifier 'nope'" in capsys.readouterr().err
    assert fake_load_model == []
    # a built-in, built from its options with the generator (the anti-expert loaded by name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in PROMPTS.prompts))
    code = main(["detox-eval", "--model", "tiny", "--prompts", str(prompts), "--k", "2", "--max-new-tokens", "2",
                 "--scorer", "keyword", "--no-benign", "--limit", "1", "--out", str(tmp_path / "x"),
                 "--detoxifier", "dexperts", "--detoxifier-opt", "anti_expert=anti", "--detoxifier-opt", "alpha=0.5"])
    assert code == 0 and fake_load_model == ["tiny", "anti"]
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    assert "dexperts" in json.dumps(config) and "0.5" in json.dumps(config)
    code = main(["detox-eval", "--prompts", str(prompts), "--out", str(tmp_path / "y"), "--detoxifier", "dexperts",
                 "--detoxifier-opt", "alpha=1"])
    assert code == 2 and "anti_expert" in capsys.readouterr().err


def test_default_scorer_spec_goes_through_load_judge(tokenizer, tmp_path):
    summary = evaluate_toxicity(tiny_model("llama"), tokenizer, ["Hello"], tmp_path,
                                **{**FAST, "scorer": "keyword", "k": 2})
    assert summary["scorer"] == "KeywordJudge()" and summary["n_prompts"] == 1
    assert np.isfinite(summary["emt"])


def test_requests_default_to_chat_and_scoring_with_the_prompt(tokenizer, tmp_path, monkeypatch):
    seen: list = []

    class Recording:
        """A stub scorer: 0.6 for every sample, recording what it was given."""

        def score(self, responses, prompts=None):
            seen.append(prompts)
            return [0.6] * len(responses)

    requests = PromptSet([ToxicityPrompt("r1", "Tell me a joke")], "stub", kind="request")
    calls: list = []
    real = editkit.generate

    @functools.wraps(real)
    def record(model, tok, prompts, **kwargs):
        calls.append(kwargs)
        return real(model, tok, prompts, **kwargs)

    monkeypatch.setattr(editkit, "generate", record)
    summary = evaluate_toxicity(tiny_model("llama"), tokenizer, requests, tmp_path, **{**FAST, "scorer": Recording()})
    assert calls[0]["chat_template"] == "auto" and calls[0]["do_sample"] is True and calls[0]["top_k"] == 0
    assert seen == [["Tell me a joke"] * 3]
    assert summary["emt"] == pytest.approx(0.6) and summary["toxicity_probability"] == 1.0
    again = evaluate_toxicity(tiny_model("llama"), tokenizer, requests, tmp_path,
                              **{**FAST, "scorer": Recording(), "label": "renamed"})
    assert again["label"] == "renamed" and len(calls) == 1  # a new label on resume; nothing generated again


def test_the_packaged_judge_read_from_another_checkout_is_the_same_scorer(tokenizer, tmp_path):
    """A run resumes, and the report does not flag the scorer, when only the folder the packaged
    judge head was read from differs (another checkout or install); another head still differs."""
    import json as _json

    from safeedit.toxicity import markdown_table

    model = tiny_model("llama")
    evaluate_toxicity(model, tokenizer, PROMPTS.limited(1), tmp_path / "run", **{**FAST, "k": 1})
    config = tmp_path / "run" / "config.json"
    settings = _json.loads(config.read_text())
    settings["scorer"] = "EmbeddingJudge(head_dir='/elsewhere/checkout/safeedit/data', device='cpu')"
    config.write_text(_json.dumps(settings))
    here = "EmbeddingJudge(head_dir='/work/x/safeedit/data', device='cpu')"

    class Named(KeywordJudge):
        def __repr__(self):
            return here

    evaluate_toxicity(model, tokenizer, PROMPTS.limited(2), tmp_path / "run", **{**FAST, "k": 1, "scorer": Named()})
    assert len(rows_of(tmp_path / "run")) == 2
    same = markdown_table({"a": {"scorer": settings["scorer"]}, "b": {"scorer": here}})
    assert "differ" not in same and "head_dir='safeedit/data'" in same
    other = markdown_table({"a": {"scorer": settings["scorer"]}, "b": {"scorer": "EmbeddingJudge(head_dir='/my/heads', device='cpu')"}})
    assert "**scorer differ between runs**" in other
