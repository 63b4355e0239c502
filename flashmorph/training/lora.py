"""LoRA adapters (peft) on a hybrid student, their files, and merging them into plain weights for export."""

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from flashmorph.errors import CheckpointError
from flashmorph.io import atomic as io_atomic

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # the name peft's save_pretrained / from_pretrained use


def add_lora(lm: nn.Module, *, rank: int, alpha: float, targets: list[str], layers: list[int] | None,
             tensor_parallel: bool = False) -> nn.Module:
    """Wrap `lm` with peft LoRA adapters on `targets` in `layers` (None = every layer); base weights stay frozen.
    `tensor_parallel`: `lm` went through parallel.tensor.apply_tensor_parallel, so adapters split like its layers."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                        layers_to_transform=layers, layers_pattern="layers" if layers is not None else None)
    if tensor_parallel:
        from flashmorph.parallel.lora_tp import register_tensor_parallel_lora

        register_tensor_parallel_lora(config)
    return get_peft_model(lm, config)


def adapter_state(peft_model: nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a gathered state dict, under peft's file names."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=full_state)


def save_adapter(peft_model: nn.Module, full_state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """adapter_model.safetensors + adapter_config.json, each written atomically. The config is peft's own
    serialization with `target_modules` sorted: peft keeps them as a set and writes them in hash order, so the same
    run gave different bytes in every process, and its in-place write could be cut by a kill."""
    tensors = {k: v.contiguous() for k, v in adapter_state(peft_model, full_state).items()}
    io_atomic.atomic_save_safetensors(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    with tempfile.TemporaryDirectory() as scratch:
        peft_model.peft_config["default"].save_pretrained(scratch)
        config = json.loads((Path(scratch) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    io_atomic.atomic_write_text(out_dir / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapter(peft_model: nn.Module, adapter_dir: Path, tensor_parallel: bool = False) -> None:
    """Load adapter weights written by save_adapter (hash-verified) into a model wrapped with the same config;
    with `tensor_parallel` (add_lora's), each TP rank takes its slices of the whole adapters in the file."""
    from peft import set_peft_model_state_dict

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; student.init_from must be a finished LoRA distill run")
    tensors = io_atomic.load_safetensors_verified(path)
    if tensor_parallel:
        from flashmorph.parallel.lora_tp import slice_adapter_state

        tensors = slice_adapter_state(tensors, peft_model)
    result = set_peft_model_state_dict(peft_model, tensors)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise CheckpointError(f"{path} holds adapters this recipe does not create ({unexpected[0]}, ...); "
                              "use the same distill.lora_* settings as the run that wrote it")


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """peft-named full state -> the base model's names with W + scaling * B @ A folded in (adapter "default")."""
    merged: dict[str, torch.Tensor] = {}
    prefix = "base_model.model."
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        plain = name[len(prefix):] if name.startswith(prefix) else name
        if ".base_layer." in plain:
            module = name.rsplit(".base_layer.", 1)[0]
            plain = plain.replace(".base_layer.", ".")
            a_key, b_key = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
            if plain.endswith(".weight") and a_key in state:
                delta = state[b_key].float() @ state[a_key].float()  # [out, r] @ [r, in]
                tensor = (tensor.float() + scaling * delta).to(tensor.dtype)
        merged[plain] = tensor
    return merged
