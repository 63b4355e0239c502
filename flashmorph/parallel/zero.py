"""DeepSpeed ZeRO: config generation from a recipe, engine construction, gathering and checkpoints."""

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from flashmorph.parallel.deepspeed_json import read_deepspeed_json

log = logging.getLogger(__name__)


def _deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def build_ds_config(
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    dtype: str,
    zero_stage: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    warmup_steps: int = 0,
    override_file: str | None = None,
) -> dict:
    """The DeepSpeed JSON for a trainable-only optimizer group; `override_file` keys win."""
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        # torch's AdamW: a fused CUDA Adam buys nothing for a few scalars and its JIT build is fragile
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True}},
        "zero_optimization": {
            "stage": zero_stage,
            # frozen weights are gathered layer by layer; keep nothing persistent beyond tiny tensors
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 5e7,
        },
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,  # our own logger reports progress
        "wall_clock_breakdown": False,
    }
    if grad_clip > 0:
        config["gradient_clipping"] = grad_clip
    if warmup_steps > 0:  # linear warm-up to lr, then constant
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                              "warmup_num_steps": warmup_steps, "warmup_type": "linear"}}
    if override_file:
        _deep_update(config, read_deepspeed_json(override_file))
    return config


@contextmanager
def zero3_model_init(ds_config: dict):
    """While open, transformers' from_pretrained/from_config partition weights at creation (zero.Init),
    so no rank ever holds the whole model; a no-op below stage 3."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # zero.Init partitions over the whole world (= SP x DP when TP is 1) and knows no mpu, so its batch check would
    # count SP ranks as data parallel: leave the batch sizes for DeepSpeed to derive from the micro batch
    init_config = {k: v for k, v in ds_config.items() if k not in ("train_batch_size", "gradient_accumulation_steps")}
    keep_alive = HfDeepSpeedConfig(init_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def initialize_engine(model: nn.Module, trainable: list[nn.Parameter], ds_config: dict, mpu=None):
    """The DeepSpeed engine over `model`, optimizing only `trainable` (one param group); `mpu` (from
    parallel.mesh) tells ZeRO which ranks shard and average together when TP/SP are on."""
    import deepspeed

    if mpu is not None and hasattr(mpu, "get_sequence_data_parallel_group"):
        from flashmorph.parallel.mesh import place_zero_partitions

        place_zero_partitions(model, mpu.get_sequence_data_parallel_group())  # SP ranks must reduce grads together
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[{"params": trainable}], config=ds_config,
                                           mpu=mpu)
    return engine


def gathered(params, modifier_rank=None):
    """Context in which ZeRO-3-partitioned `params` hold their full values (a no-op otherwise)."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return nullcontext()


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of `module`'s parameters, gathered if ZeRO-3 partitioned them."""
    with gathered(module.parameters()):
        return {name: p.detach().float().cpu().clone() for name, p in module.named_parameters()}


def save_engine_checkpoint(engine, directory: Path, client_state: dict) -> None:
    """Every rank writes its shard of the trainable state (frozen weights are excluded: they never change)."""
    engine.save_checkpoint(str(directory), tag="state", client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)


def load_engine_checkpoint(engine, directory: Path) -> dict:
    """Restore trainable weights, optimizer and scheduler state; returns the client state.

    DeepSpeed's loads run with weights_only forced on (io.safe_load): a file that asks to build anything but
    tensors and the allow-listed DeepSpeed types is refused, never executed."""
    from flashmorph.io.safe_load import is_refused_pickle, refused_pickle_error, weights_only_loads

    try:
        with weights_only_loads():
            _, client_state = engine.load_checkpoint(str(directory), tag="state", load_module_strict=False,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as err:
        if is_refused_pickle(err):
            raise refused_pickle_error(err, directory) from None
        raise
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    return client_state


def weights_ds_config(world_size: int, dtype: torch.dtype) -> dict:
    """ZeRO-3 config for `save_weights_checkpoint`: partitions in the model's dtype, no optimizer section."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "sub_group_size": 10**8},  # DeepSpeed allocates a zeroed fp32 buffer of one sub group
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def save_weights_checkpoint(model: nn.Module, ds_config: dict, directory: Path, tag: str) -> None:
    """Every rank writes `model`'s weights (built under `zero3_model_init(ds_config)`) as a ZeRO-3 checkpoint of
    this world's DP size.

    All parameters become trainable under SGD(lr=0, no momentum): SGD keeps no state, so the optimizer files hold
    only the fp32 master partitions (4 bytes/param), which deepspeed's zero_to_fp32 reads one tensor at a time;
    lr=0 keeps DeepSpeed's zero-gradient warm-up step from moving any weight.
    """
    import deepspeed

    model.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.0, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.save_checkpoint(str(directory), tag=tag, save_latest=True)


def gather_state_dict(module: nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The full parameters of a (possibly ZeRO-3 partitioned) module, one tensor gathered at a time so no rank holds
    more than one extra full tensor on the device; every rank must call it, only `keep` ranks get the CPU copy."""
    state = {} if keep else None
    for name, param in module.named_parameters():
        with gathered([param]):
            if keep:
                state[name] = param.detach().cpu().clone()
    return state
