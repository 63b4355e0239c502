"""`reshard(...)`: check a conversion request, stream the source into a staging directory, verify, seal with a manifest.

Memory: HF and TP sources/targets move one tensor at a time (peak: one full tensor plus its TP pieces); ZeRO-3 sources
add deepspeed's lazy consolidation (one fp32 tensor, rank files memory-mapped); ZeRO-3 targets need a DeepSpeed engine
per DP rank (~16 bytes per parameter of its share). Measured figures: tools/reshard.py --help and docs/reshard.md.
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from flashmorph.checkpoint import atomic
from flashmorph.checkpoint.reshard import adapter, hf, zero3
from flashmorph.errors import CheckpointError, ConfigError
from flashmorph.model.load import SUPPORTED_MODEL_TYPES
from flashmorph.model.shape import ModelShape
from flashmorph.parallel import distributed
from flashmorph.parallel import tp_shards as tp_files

log = logging.getLogger(__name__)
FORMATS = ("zero3", "hf", "tp")
# small files that travel with the weights (config, tokenizer, generation settings)
_SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_NOT_SIDE = {hf.INDEX_FILE, atomic.MANIFEST_NAME, tp_files.LAYOUT_FILE}


@dataclass(frozen=True)
class ReshardPlan:
    """A checked request: everything `reshard` needs before it reads a single weight."""

    src_format: str
    dst_format: str
    src: Path
    dst: Path
    config_dir: Path
    config: object  # transformers PretrainedConfig
    dims: ModelShape
    tp: int | None
    dp: int | None


def plan_reshard(src_format: str, dst_format: str, src, dst, *, tp: int | None = None, dp: int | None = None,
                 config_dir=None, force: bool = False) -> ReshardPlan:
    """Validate a request cheaply (no weight is read); a one-line FlashMorphError names the bad input."""
    for flag, value in (("--from", src_format), ("--to", dst_format)):
        if value not in FORMATS:
            raise ConfigError(f"{flag} {value!r} is not a format; use one of {', '.join(FORMATS)}")
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise ConfigError(f"--src {src} is not a directory")
    if dst == src or dst in src.parents or src in dst.parents:
        raise ConfigError(f"--dst {dst} overlaps --src {src}; write to a separate directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise ConfigError(f"--dst {dst} exists and is not empty; pass --force to replace it")
    if dst_format == "tp" and tp is None:
        raise ConfigError("--to tp needs --tp N (the tensor-parallel size to write)")
    if dst_format != "tp" and tp is not None:
        raise ConfigError(f"--tp only applies to --to tp (a tp source's size is read from its {tp_files.LAYOUT_FILE})")
    if dst_format != "zero3" and dp is not None:
        raise ConfigError("--dp only applies to --to zero3 (a zero3 source's DP size is read from its files)")
    if dst_format == "zero3":
        dp = 1 if dp is None else dp
        if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
            raise ConfigError(f"--dp must be an int >= 1, got {dp!r}")

    config_dir = Path(config_dir).resolve() if config_dir is not None else src
    if not (config_dir / "config.json").is_file():
        hint = "pass --config <HF model dir> (ZeRO-3 checkpoints carry no config)" if config_dir == src else \
            "point --config at a HF model directory"
        raise ConfigError(f"{config_dir} holds no config.json; {hint}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model type {config.model_type!r} is not supported; reshard handles {SUPPORTED_MODEL_TYPES}")
    dims = ModelShape.from_config(config)
    if dst_format == "tp":
        adapter.check_tp_size(dims, tp)

    # the source's files must be there before anything heavy starts
    if src_format == "hf":
        for name in hf.hf_weight_files(src):
            if not (src / name).is_file():
                raise CheckpointError(f"{src / name} is missing; the HF checkpoint is incomplete")
    elif src_format == "tp":
        layout = tp_files.read_layout(src)
        for name in layout["files"]:
            if not (src / name).is_file():
                raise CheckpointError(f"{src / name} is missing; the TP checkpoint is incomplete")
        if layout.get("dims") != adapter.layout_dims(dims):
            raise ConfigError(f"{src / tp_files.LAYOUT_FILE} was written for other model sizes than "
                              f"{config_dir / 'config.json'}; pass the matching --config")
    else:
        zero3.rank_files(src, zero3.resolve_tag(src))
    return ReshardPlan(src_format, dst_format, src, dst, config_dir, config, dims, tp, dp)


def reshard(src_format: str, dst_format: str, src, dst, *, tp: int | None = None, dp: int | None = None,
            config_dir=None, force: bool = False, max_shard_size: int | str = "5GB",
            show_progress: bool = True) -> Path:
    """Convert a checkpoint between ZeRO-3 (any DP size), consolidated HF safetensors and TP shards (any TP size).

    The output is written into `.tmp-<dst name>` next to dst, checked (every file reopened, every tensor's shape
    and dtype as planned), sealed with a sha256 manifest and renamed to dst. A source that has a manifest is
    verified against it first (so a flipped bit fails by file name); without one, truncation is still caught.
    A ZeRO-3 target is written by `dp` local CPU processes, or, when called under a launcher (deepspeed, torchrun,
    srun: WORLD_SIZE > 1) or inside a process group, by the ranks of that world (DP size = world size).
    """
    if dst_format == "zero3" and distributed.in_world():
        return _reshard_to_zero3_in_world(src_format, src, dst, dp=dp, config_dir=config_dir, force=force,
                                          max_shard_size=max_shard_size, show_progress=show_progress)
    plan = plan_reshard(src_format, dst_format, src, dst, tp=tp, dp=dp, config_dir=config_dir, force=force)
    hf.parse_size(max_shard_size)  # a bad size fails before anything heavy
    expected, aliases, source = open_checked_source(plan)
    staging, scratch = _fresh_staging(plan.dst)
    try:
        names = list(expected)
        if plan.dst_format == "hf":
            hf.write_hf(source, names, staging, max_shard_size, show_progress)
        elif plan.dst_format == "tp":
            tp_files.write_tp(source, names, staging, plan.tp, plan.dims, show_progress)
        else:
            hf_dir = _hf_dir_for_zero3(plan, source, names, scratch, max_shard_size, show_progress)
            zero3.write_zero3(hf_dir, staging, plan.dp)
        _check_and_seal(plan, staging, expected, aliases, source)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return plan.dst


def _reshard_to_zero3_in_world(src_format, src, dst, *, dp, config_dir, force, max_shard_size, show_progress) -> Path:
    """The ZeRO-3 target written by the ranks of the current world; rank 0 checks, stages and seals. Across nodes
    --dst must be on a filesystem every rank sees."""
    with distributed.joined_world() as info:
        if dp is not None and dp != info.world_size:
            raise ConfigError(f"--dp {dp} differs from the launcher's world size {info.world_size}; "
                              "launch as many ranks as the DP size to write")
        plan = plan_reshard(src_format, "zero3", src, dst, dp=info.world_size, config_dir=config_dir, force=force)
        hf.parse_size(max_shard_size)
        state = {}

        def prepare():
            state["expected"], state["aliases"], state["source"] = open_checked_source(plan)
            state["staging"], state["scratch"] = _fresh_staging(plan.dst)
            names = list(state["expected"])
            return str(_hf_dir_for_zero3(plan, state["source"], names, state["scratch"], max_shard_size,
                                         show_progress))

        hf_dir = distributed.broadcast_object(distributed.run_on_main(prepare, info))
        staging = plan.dst.parent / f".tmp-{plan.dst.name}"
        try:
            zero3.save_rank(info, hf_dir, str(staging), zero3.TAG)
            distributed.barrier()
            distributed.run_on_main(lambda: _check_and_seal(plan, staging, state["expected"], state["aliases"],
                                                            state["source"]), info)
        finally:
            if info.is_main:
                for leftover in (state.get("scratch"), staging):  # staging is gone after a successful seal
                    if leftover is not None:
                        shutil.rmtree(leftover, ignore_errors=True)
    return plan.dst


def open_checked_source(plan: ReshardPlan):
    """(expected weights, tied aliases, source): the source verified against its manifest and the config."""
    expected, aliases = adapter.hf_weights(plan.config)
    if (plan.src / atomic.MANIFEST_NAME).is_file():
        atomic.verify(plan.src, deep=True)
    elif plan.src_format == "tp":
        raise CheckpointError(f"TP checkpoint {plan.src} has no {atomic.MANIFEST_NAME}; it is incomplete")
    return expected, aliases, open_source(plan, expected, aliases)


def _fresh_staging(dst: Path) -> tuple[Path, Path]:
    """(staging dir, scratch dir for a temporary HF copy) next to dst; stale ones from a crash are removed."""
    staging, scratch = dst.parent / f".tmp-{dst.name}", dst.parent / f".tmp-{dst.name}-hf"
    for stale in (staging, scratch):
        if stale.exists():
            log.warning("removing %s left by an interrupted reshard", stale)
            shutil.rmtree(stale)
    staging.mkdir(parents=True)
    return staging, scratch


def _hf_dir_for_zero3(plan: ReshardPlan, source, names, scratch: Path, max_shard_size, show_progress) -> Path:
    """zero.Init loads through transformers, which reads a HF directory: the source itself, or a scratch copy."""
    if plan.src_format == "hf":
        return plan.src
    scratch.mkdir()
    hf.write_hf(source, names, scratch, max_shard_size, show_progress)
    copy_side_files(plan.config_dir, scratch)
    return scratch


def _check_and_seal(plan: ReshardPlan, staging: Path, expected: dict, aliases: set[str], source) -> None:
    copy_side_files(plan.config_dir, staging)
    check_output(plan, staging, expected, aliases, source)
    meta = {"reshard": {"from": plan.src_format, "to": plan.dst_format, "src": str(plan.src),
                        "tp": plan.tp, "dp": plan.dp}, "versions": _versions()}
    atomic.seal_directory(staging, plan.dst, meta)
    atomic.verify(plan.dst, deep=False)
    log.info("resharded %s (%s) -> %s (%s)", plan.src, plan.src_format, plan.dst, plan.dst_format)


def open_source(plan: ReshardPlan, expected: dict, aliases: set[str]):
    """The source as an object with .specs ({hf_name: (shape, dtype)}) and .get(hf_name) -> full tensor."""
    if plan.src_format == "zero3":
        return zero3.Zero3Source(plan.src, expected, aliases)
    source = hf.HFSource(plan.src) if plan.src_format == "hf" else tp_files.TPSource(plan.src)
    check_names(source.specs, expected, aliases, plan.src)
    return source


def check_names(specs: dict, expected: dict, aliases: set[str], where: Path) -> None:
    """The source holds exactly the config's weights, with the config's shapes (its dtypes are kept as stored)."""
    missing = [name for name in expected if name not in specs]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} of the model's {len(expected)} weights "
                              f"(e.g. {missing[0]}); the checkpoint does not match {where}/config.json or --config")
    unexpected = [name for name in specs if name not in expected and name not in aliases]
    if unexpected:
        raise CheckpointError(f"{where} holds {len(unexpected)} tensors the config's model does not have "
                              f"(e.g. {unexpected[0]}); pass the matching --config")
    for name, (shape, _) in expected.items():
        if tuple(specs[name][0]) != tuple(shape):
            raise CheckpointError(f"{where}: {name} has shape {list(specs[name][0])}, the config says {list(shape)}")


def check_output(plan: ReshardPlan, out_dir: Path, expected: dict, aliases: set[str], source) -> None:
    """Reopen what was written: every file parses and holds each planned tensor with the source's shape and dtype."""
    if plan.dst_format == "hf":
        written = hf.HFSource(out_dir).specs
    elif plan.dst_format == "tp":
        written = tp_files.TPSource(out_dir).specs
    else:
        written = zero3.Zero3Source(out_dir, expected, aliases).specs
    want = {name: (tuple(source.specs[name][0]), source.specs[name][1]) for name in expected}
    if plan.dst_format == "zero3":  # ZeRO-3 keeps fp32 masters; it is read back in the config's dtypes
        want = {name: (shape, expected[name][1]) for name, (shape, _) in want.items()}
    got = {name: (tuple(shape), dtype) for name, (shape, dtype) in written.items()}
    if got != want:
        bad = next(name for name in sorted(set(want) | set(got)) if want.get(name) != got.get(name))
        raise CheckpointError(f"reshard wrote {bad} as {got.get(bad)}, planned {want.get(bad)}; output discarded")


def copy_side_files(config_dir: Path, out_dir: Path) -> None:
    """config.json, generation_config.json and tokenizer files, so the output is a complete model directory."""
    for path in sorted(config_dir.iterdir()):
        if path.is_file() and path.suffix in _SIDE_SUFFIXES and path.name not in _NOT_SIDE:
            shutil.copy2(path, out_dir / path.name)


def _versions() -> dict:
    from flashmorph.versions import collect_versions

    return collect_versions()

