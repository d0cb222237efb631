"""LoRA adapters as data: what each module adds (A, B, scale), stored as safetensors bytes,
combined by concatenating ranks, merged into a model, and moved in and out of peft folders.

A LoRA adds scale·B·A·v to a module's output W·v. Several LoRAs on one model add up, which is
exactly one LoRA whose A stacks theirs and whose B stacks theirs times their scales: that is
how a plug-in trained on top of another is exported as one standard peft adapter.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

from recipes import PersonaError

PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
ATTENTION_NAMES = re.compile(r"attention|attn", re.IGNORECASE)


@dataclass
class LoraWeights:
    """Per module path (e.g. 'model.layers.0.self_attn.q_proj'): A (r×in), B (out×r) and scale."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {path: a.shape[0] for path, (a, _) in self.modules.items()}

    def to_bytes(self) -> bytes:
        """safetensors bytes with peft's key names; the per-module scales ride in the metadata."""
        tensors = {}
        for path, (a, b) in self.modules.items():
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.detach().to("cpu", torch.float32).contiguous()
        return save_safetensors(tensors, metadata={"scales": json.dumps(self.scales, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "LoraWeights":
        tensors = load_safetensors(data)
        scales = json.loads(_metadata(data).get("scales", "{}"))
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _KEY.match(key)
            if match is None:
                raise PersonaError(f"adapter weights hold an unexpected tensor '{key}'")
            parts.setdefault(match.group(1), {})[match.group(2)] = tensor
        modules = {path: (p["A"], p["B"]) for path, p in parts.items()}
        return cls(modules, {path: float(scales.get(path, 1.0)) for path in modules})

    def delta(self, path: str) -> torch.Tensor:
        """The dense update scale·B·A of one module (out×in)."""
        a, b = self.modules[path]
        return self.scales[path] * (b.float() @ a.float())


def _metadata(data: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes (header: 8-byte length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    return header.get("__metadata__", {}) or {}


def combine(adapters: list[LoraWeights]) -> LoraWeights:
    """One LoRA that adds what all of `adapters` add: ranks concatenated, scales folded into B."""
    if len(adapters) == 1:
        return adapters[0]
    stacked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for adapter in adapters:
        for path, (a, b) in adapter.modules.items():
            a_parts, b_parts = stacked.setdefault(path, ([], []))
            a_parts.append(a.float())
            b_parts.append(b.float() * adapter.scales[path])
    modules = {path: (torch.cat(a_parts), torch.cat(b_parts, dim=1)) for path, (a_parts, b_parts) in stacked.items()}
    return LoraWeights(modules, {path: 1.0 for path in modules})


def mix_pieces(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_s w_s·B_s·A_s as one LoRA of rank k·r: A stacks the k pieces' A (k, r, in) -> (k·r, in),
    B stacks their B (k, out, r) times their weights -> (out, k·r). Per-Pcs's mixing formula."""
    return a.flatten(0, 1), (b * weights.to(b.dtype)[:, None, None]).permute(1, 0, 2).flatten(1)


# ---------- the model side ----------


def find_target_modules(model: torch.nn.Module) -> list[str]:
    """Names of the attention projections (linear layers inside attention blocks), e.g. q_proj,
    k_proj, v_proj, o_proj for Llama, q, k, v, o for T5, c_attn and c_proj for GPT-2."""
    names = set()
    for path, module in model.named_modules():
        if not _is_linear(module) or "." not in path:
            continue
        parent = path.rsplit(".", 1)[0]
        if ATTENTION_NAMES.search(type(model.get_submodule(parent)).__name__):
            names.add(path.rsplit(".", 1)[1])
    if not names:
        raise PersonaError(f"found no attention projections in {type(model).__name__}; pass --target-modules")
    return sorted(names)


def check_target_modules(model: torch.nn.Module, names: list[str]) -> None:
    """Every requested module name must name at least one linear layer of the model."""
    leaves = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if _is_linear(m)}
    missing = [n for n in names if n not in leaves and not any(p.endswith("." + n) for p, _ in model.named_modules())]
    if missing:
        raise PersonaError(f"--target-modules: {type(model).__name__} has no linear layer named '{missing[0]}'")


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def module_shapes(model: torch.nn.Module, paths: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each module path; a clear error when the model lacks one."""
    shapes = {}
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise PersonaError(f"this LLM has no module '{path}' that the adapter was made for") from None
        weight = module.weight
        shapes[path] = tuple(weight.shape) if isinstance(module, torch.nn.Linear) else tuple(weight.shape[::-1])
    return shapes


def check_fits(model: torch.nn.Module, adapter: LoraWeights) -> None:
    """The adapter's shapes must match the model's modules (same architecture and size)."""
    shapes = module_shapes(model, list(adapter.modules))
    for path, (a, b) in adapter.modules.items():
        out_features, in_features = shapes[path]
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise PersonaError(
                f"adapter module '{path}' is {b.shape[0]}×{a.shape[1]} but the LLM's is {out_features}×{in_features}"
            )


@torch.no_grad()
def merge_into(model: torch.nn.Module, adapter: LoraWeights) -> None:
    """Add the adapter to the model's weights in place (used for a plug-in's base, served to every row)."""
    check_fits(model, adapter)
    for path in adapter.modules:
        module = model.get_submodule(path)
        delta = adapter.delta(path).to(module.weight.device, module.weight.dtype)
        module.weight += delta if isinstance(module, torch.nn.Linear) else delta.T


def from_peft_model(peft_model: Any, adapter_name: str = "default") -> LoraWeights:
    """Read A, B and the scale of every LoRA layer of a peft model (plain LoRA only)."""
    from peft.tuners.lora import LoraLayer

    modules, scales = {}, {}
    for path, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if module.use_dora.get(adapter_name, False):
            raise PersonaError(f"module '{path}' uses DoRA; only plain LoRA adapters are supported")
        a = module.lora_A[adapter_name].weight.detach().float().cpu().clone()
        b = module.lora_B[adapter_name].weight.detach().float().cpu().clone()
        if a.dim() != 2:
            raise PersonaError(f"module '{path}' is not a linear LoRA layer; only linear layers are supported")
        modules[path] = (a, b)
        scales[path] = float(module.scaling[adapter_name])
    if not modules:
        raise PersonaError("the adapter holds no LoRA layers")
    return LoraWeights(modules, scales)


# ---------- peft folders ----------


def export_peft(adapter: LoraWeights, llm_id: str, directory: str | Path, is_seq2seq: bool = False) -> Path:
    """Write a standard peft adapter folder (adapter_config.json, adapter_model.safetensors) that
    `PeftModel.from_pretrained(base_llm, directory)` loads; ranks are padded to one common rank."""
    from peft import LoraConfig

    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        raise PersonaError(f"{target} exists and is not empty; choose a new directory")
    uniform = len(set(adapter.ranks.values())) == 1 and len(set(adapter.scales.values())) == 1
    if uniform:
        rank = next(iter(adapter.ranks.values()))
        alpha = next(iter(adapter.scales.values())) * rank
        modules = adapter.modules
    else:
        rank = alpha = max(adapter.ranks.values())
        modules = {path: _padded(a, b * adapter.scales[path], rank) for path, (a, b) in adapter.modules.items()}
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=sorted(modules), bias="none",
        task_type="SEQ_2_SEQ_LM" if is_seq2seq else "CAUSAL_LM", base_model_name_or_path=llm_id,
    )  # fmt: skip
    target.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(target))
    tensors = {}
    for path, (a, b) in modules.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.float().contiguous()
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target


def _padded(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and columns of B up to `rank`: the same update, a wider matrix."""
    return zero_pad(a, rank, 0), zero_pad(b, rank, 1)


def zero_pad(tensor: torch.Tensor, size: int, dim: int, left: bool = False) -> torch.Tensor:
    """`tensor` grown to `size` along `dim` with zeros after it (before it with `left`)."""
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    zeros = tensor.new_zeros(shape)
    return torch.cat([zeros, tensor] if left else [tensor, zeros], dim=dim)


def check_peft_folder(directory: str | Path) -> Path:
    """The folder, if it holds a peft adapter config (checked before any model loads)."""
    folder = Path(directory)
    if not (folder / "adapter_config.json").is_file():
        raise PersonaError(f"{folder}: no adapter_config.json; not a peft adapter folder")
    return folder


def read_peft_folder(directory: str | Path, model: torch.nn.Module) -> tuple[LoraWeights, dict[str, Any]]:
    """Load a peft LoRA folder onto `model` with peft itself (so its rank and alpha rules apply),
    read the weights back, and leave the model as it was. Returns the weights and the folder's config."""
    from peft import PeftConfig, PeftModel

    folder = check_peft_folder(directory)
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise PersonaError(f"{folder}/adapter_config.json: {str(exc).splitlines()[0]}") from None
    if str(getattr(config, "peft_type", "")).split(".")[-1].upper() != "LORA":
        raise PersonaError(f"{folder}: peft_type is {config.peft_type}; only LoRA adapters can be imported")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name="imported")
    except Exception as exc:
        raise PersonaError(f"{folder}: peft cannot load it onto this LLM: {str(exc).splitlines()[0]}") from None
    try:
        weights = from_peft_model(peft_model, "imported")
    finally:
        peft_model.unload()
    return weights, json.loads((folder / "adapter_config.json").read_text())
