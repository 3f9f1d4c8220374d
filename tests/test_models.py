"""Model loading (local folders only: no downloads), tiny models, batched generation, cheap import."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import editkit
from editkit.models import TINY_TYPES, load_model, tiny_model, tiny_tokenizer
from editkit.text import prompt_ids

REPO_ROOT = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[5, 70, 80, 90, 100, 33]])


def test_tiny_families_match_the_fixture_table() -> None:
    # conftest.FAMILIES parametrises the family-wide tests: it must list every tiny family
    assert set(TINY_TYPES) == {"llama", "mistral", "qwen2", "gpt2", "gpt_neox"}
    with pytest.raises(ValueError, match="no tiny model"):
        tiny_model("t5")


def test_tiny_model_properties(tiny_lm, family: str) -> None:
    assert tiny_lm.config.model_type == family
    assert not tiny_lm.training
    assert next(tiny_lm.parameters()).dtype == torch.float32
    assert tiny_lm.get_output_embeddings().weight.shape[0] == len(tiny_tokenizer())
    same = tiny_model(family)
    other = tiny_model(family, seed=1)
    with torch.no_grad():
        assert torch.equal(tiny_lm(IDS).logits, same(IDS).logits)  # seeded: reproducible
        assert not torch.allclose(tiny_lm(IDS).logits, other(IDS).logits)


def test_tiny_tokenizer(tokenizer) -> None:
    text = "Héllo, wörld! 123"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template
    assert not tiny_tokenizer(chat_template=False).chat_template


# --------------------------------------------------------------------------- load_model


@pytest.fixture
def saved_tiny(tmp_path: Path, tokenizer) -> tuple[Path, torch.nn.Module]:
    model = tiny_model("llama")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_load_model_from_folder(saved_tiny) -> None:
    folder, original = saved_tiny
    model, tok = load_model(str(folder), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, original(IDS).logits, rtol=0, atol=0)
    assert tok.pad_token is not None
    assert tok.encode("abc", add_special_tokens=False) == tiny_tokenizer().encode("abc", add_special_tokens=False)
    half, _ = load_model(str(folder), device="cpu", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_model_missing_path(tmp_path: Path) -> None:
    for missing in (tmp_path / "nowhere", tmp_path / "a" / "b"):
        with pytest.raises(FileNotFoundError, match="not found"):
            load_model(str(missing), device="cpu")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("./definitely-not-here", device="cpu")


def test_load_model_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


def test_load_model_missing_gguf(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.Q4_1.gguf"), device="cpu")


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_model_reads_safetensors_only(saved_tiny, tmp_path: Path) -> None:
    """A folder whose weights are only a pickle is refused, and the pickle is never unpickled."""
    folder, _ = saved_tiny
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(OSError):
        load_model(str(folder), device="cpu")
    assert not marker.exists()


# --------------------------------------------------------------------------- generation

PROMPTS = [
    "Hi",
    "What is the weather like today in Paris, and should I take an umbrella?",
    "x",
    "Tell me a story about a dragon.",
    "ok then, what about tomorrow",
]
# the random models' favourite tokens are specials, which decode to nothing: keep them out
NO_SPECIALS = dict(suppress_tokens=[0, 1, 2, 3])


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_batched_generation_equals_one_at_a_time(family: str, chat: bool) -> None:
    # untied embeddings: a tied random model just repeats the prompt's last token ("\n")
    tiny_lm = tiny_model(family, tie_word_embeddings=False)
    tok = tiny_tokenizer(chat_template=chat)
    batched = editkit.generate(tiny_lm, tok, PROMPTS, max_new_tokens=6, batch_size=2, **NO_SPECIALS)
    assert isinstance(batched, list) and len(batched) == len(PROMPTS)
    alone = [editkit.generate(tiny_lm, tok, [p], max_new_tokens=6, batch_size=1, **NO_SPECIALS)[0] for p in PROMPTS]
    assert batched == alone
    # and both equal plain greedy decoding of each unpadded prompt, in input order
    for prompt, text in zip(PROMPTS, batched):
        ids = torch.tensor([prompt_ids(tok, prompt)])
        out = tiny_lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=6, pad_token_id=tok.pad_token_id, **NO_SPECIALS)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert len(set(batched)) > 1  # the comparison is not between empty strings


def test_generate_with_suffix_and_errors(tokenizer) -> None:
    model = tiny_model("gpt2")
    with_suffix = editkit.generate(model, tokenizer, ["Hi"], max_new_tokens=4, suffix="Be kind.", **NO_SPECIALS)
    by_hand = editkit.generate(model, tokenizer, ["Hi Be kind."], max_new_tokens=4, **NO_SPECIALS)
    assert with_suffix == by_hand
    assert editkit.generate(model, tokenizer, [], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="not one string"):
        editkit.generate(model, tokenizer, "Hi there")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        editkit.generate(model, tokenizer, ["Hi"], batch_size=0)


# --------------------------------------------------------------------------- import cost


def test_import_editkit_is_cheap() -> None:
    code = (
        "import sys, editkit\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'yaml', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'edit' in dir(editkit) and editkit.__version__\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_lazy_names_resolve() -> None:
    for name in editkit.__all__:
        if name != "__version__":
            assert getattr(editkit, name) is not None
    with pytest.raises(AttributeError):
        editkit.no_such_thing  # noqa: B018


def test_default_model_cache_is_keyed_by_content(tmp_path) -> None:
    """The converted default model is found again after a reinstall (same bytes, new mtime), not
    for another file; copies keyed by mtime (older editkit) are removed, nothing else is."""
    import os

    from editkit.models import DEFAULT_NAME, _content_key, _remove_mtime_keyed

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(bytes(range(256)) * 40000)  # ~10 MB: beyond both chunks
    key = _content_key(gguf)
    os.utime(gguf, (1, 1))
    assert _content_key(gguf) == key
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)  # the tail differs
    gguf.write_bytes(bytes(data))
    assert _content_key(gguf) != key

    cache = tmp_path / "cache"
    keep = [cache / f"{DEFAULT_NAME}-v1-{key}", cache / "other-model-v1-98362432-1796545621",
            cache / "dinm"]
    stale = [cache / f"{DEFAULT_NAME}-v1-98362432-1796545621", cache / f"{DEFAULT_NAME}-v1-98362432-1796553799"]
    for folder in keep + stale:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    _remove_mtime_keyed(cache)
    assert all(f.is_dir() for f in keep) and not any(f.exists() for f in stale)
