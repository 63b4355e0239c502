"""DeepSpeed ZeRO-3 checkpoints of any DP size: read with deepspeed's own zero_to_fp32 (lazy mode), written by a
zero.Init engine on N local gloo ranks. DeepSpeed's files are pickles, so every read here runs with weights_only
forced on (io.safe_load): a file that asks for more than tensors and DeepSpeed's plain types is refused."""

import contextlib
import glob
import io
import logging
from pathlib import Path

import torch

from flashmorph.checkpoint.reshard import adapter
from flashmorph.errors import CheckpointError, FlashMorphError
from flashmorph.io.safe_load import (
    check_pickle_file,
    is_refused_pickle,
    refused_pickle_error,
    weights_only_loads,
)

log = logging.getLogger(__name__)
TAG = "state"  # flashmorph's engine checkpoints use this tag (flashmorph/parallel/zero.py)
_MODEL_STATES = "*_model_states.pt"
_OPTIM_STATES = "*_optim_states.pt"


def resolve_tag(ckpt_dir: Path) -> str:
    """The tag directory holding the rank files: `latest` if written, else `state`, else the only candidate."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        return latest.read_text().strip()
    if (ckpt_dir / TAG).is_dir():
        return TAG
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and glob.glob(str(p / _MODEL_STATES)))
    if len(tags) != 1:
        found = f"several ({', '.join(tags)})" if tags else "none"
        raise CheckpointError(f"{ckpt_dir} is not one DeepSpeed checkpoint: tag directories with *_model_states.pt: "
                              f"{found}; point --src at the directory that holds `latest` or the tag directory")
    return tags[0]


def rank_files(ckpt_dir: Path, tag: str) -> list[Path]:
    """Every model-state and optimizer-state file of the checkpoint; CheckpointError when a kind is missing."""
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir} names tag {tag!r} but has no {tag_dir.name}/ directory")
    files = []
    for pattern, what in ((_MODEL_STATES, "model-state"), (_OPTIM_STATES, "optimizer-state")):
        found = sorted(tag_dir.glob(pattern))
        if not found:
            raise CheckpointError(f"{tag_dir} holds no {what} files ({pattern}); the ZeRO-3 checkpoint is incomplete")
        files += found
    return files


def check_rank_files(files: list[Path]) -> None:
    """Open every rank file (memory-mapped, so cheap): a truncated or damaged one, or one that asks to run code,
    fails here, by name."""
    for path in files:
        check_pickle_file(path)  # names the refused type; the weights-only load below is the second line of defence
        try:
            with weights_only_loads():
                torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:
            if is_refused_pickle(err):
                raise refused_pickle_error(err, path) from None
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"corrupted or truncated DeepSpeed file {path} ({reason}); "
                                  "re-create the checkpoint or restore the file") from err


class Zero3Source:
    """Full HF tensors from a ZeRO-3 checkpoint, cast to the model's dtypes (`expected`: name -> (shape, dtype)).

    Trainable weights come from the fp32 master partitions of every rank through deepspeed's lazy GatheredTensor,
    with the rank files memory-mapped: only the tensor being read is materialised (fp32, plus its cast). Frozen
    weights, if the checkpoint has any, are concatenated eagerly by deepspeed: all of them sit in memory at once.
    """

    def __init__(self, ckpt_dir: str | Path, expected: dict, aliases: set[str] = frozenset()):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        self.dir = Path(ckpt_dir)
        tag = resolve_tag(self.dir)
        check_rank_files(rank_files(self.dir, tag))
        with _quiet(), weights_only_loads():
            try:
                self._state = get_fp32_state_dict_from_zero_checkpoint(str(self.dir), tag=tag, lazy_mode=True)
            except (ValueError, FileNotFoundError, KeyError) as err:
                raise CheckpointError(f"deepspeed cannot consolidate {self.dir / tag} ({err}); the checkpoint is "
                                      "incomplete or not ZeRO-3") from err
        self._map, extras = adapter.zero3_to_hf_names(list(self._state), list(expected), aliases)
        if extras:
            log.warning("skipping %d tensors that are not model weights (e.g. %s)", len(extras), extras[0])
        self.specs = {}
        for hf_name, zero_name in self._map.items():
            shape, dtype = expected[hf_name]
            if tuple(self._state[zero_name].shape) != tuple(shape):
                raise CheckpointError(f"{self.dir}: {zero_name} has shape {list(self._state[zero_name].shape)}, "
                                      f"the config says {list(shape)} for {hf_name}; pass the matching --config")
            self.specs[hf_name] = (tuple(shape), dtype)
        eager = [z for z in self._map.values() if isinstance(self._state[z], torch.Tensor)]
        if eager:
            size = sum(self._state[z].numel() * self._state[z].element_size() for z in eager)
            log.warning("%d frozen weights (%.2f GB) were consolidated in memory at once by deepspeed", len(eager),
                        size / 1e9)

    def get(self, name: str) -> torch.Tensor:
        tensor = self._state[self._map[name]].contiguous()  # a GatheredTensor materialises here
        return tensor.to(self.specs[name][1])


@contextlib.contextmanager
def _quiet():
    """zero_to_fp32 prints and draws progress bars for the whole model; reshard draws its own per tensor."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def save_rank(info, hf_dir: str, out_dir: str, tag: str) -> None:
    """One rank: build the model partitioned at creation (zero.Init), load the HF weights, save its partition."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from flashmorph.parallel import zero

    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    dtype = adapter.config_dtype(config)
    ds_config = zero.weights_ds_config(info.world_size, dtype)
    with zero.zero3_model_init(ds_config):
        model, loading = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, local_files_only=True,
                                                              output_loading_info=True)
    problems = {key: value for key, value in loading.items() if value and key in ("missing_keys", "mismatched_keys")}
    if problems:
        key, value = next(iter(problems.items()))
        raise FlashMorphError(f"transformers could not load {hf_dir} for ZeRO-3 ({key}: {sorted(value)[:3]})")
    zero.save_weights_checkpoint(model, ds_config, Path(out_dir), tag)


def write_zero3(hf_dir: Path, out_dir: Path, dp: int) -> None:
    """Write the HF checkpoint in hf_dir as a ZeRO-3 checkpoint of DP size `dp` into out_dir (tag `state`).

    Runs `dp` local CPU processes joined by gloo; each holds its 1/dp share through a DeepSpeed engine (~16 bytes
    per parameter of the share for bf16: partition, fp32 master, DeepSpeed's gradient buffers, transformers' loading).
    """
    from flashmorph.parallel.spawn import spawn_local

    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise FlashMorphError(f"--dp must be an int >= 1, got {dp!r}")
    spawn_local(save_rank, dp, str(hf_dir), str(out_dir), TAG)
