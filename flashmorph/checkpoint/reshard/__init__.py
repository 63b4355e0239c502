"""Reshard model weights between DeepSpeed ZeRO-3 (any DP size), consolidated HF safetensors and megatron-core
tensor-parallel shards (any TP size), streaming one tensor at a time; see convert.reshard."""

from flashmorph.checkpoint.reshard.adapter import TPRule, check_tp_size, hf_to_tp_name, layout_dims, tp_rule
from flashmorph.checkpoint.reshard.convert import FORMATS, ReshardPlan, plan_reshard, reshard
from flashmorph.checkpoint.reshard.hf import HFSource
from flashmorph.checkpoint.reshard.zero3 import Zero3Source
from flashmorph.parallel.tp_shards import TPSource

__all__ = [
    "FORMATS",
    "HFSource",
    "ReshardPlan",
    "TPRule",
    "TPSource",
    "Zero3Source",
    "check_tp_size",
    "hf_to_tp_name",
    "layout_dims",
    "plan_reshard",
    "reshard",
    "tp_rule",
]
