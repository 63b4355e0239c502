"""One rank started by deepspeed's per-node launcher (what `deepspeed --hostfile` runs on every host through pdsh).

Checks, on the world it joins: flashmorph's rank/world derivation from the launcher's variables, that a stop signal
on one rank stops every rank after the same step, and that a full disk during a gate-search checkpoint (on rank 1's
write, then on rank 0's manifest) gives one error on every rank with earlier checkpoints intact. Writes rank<N>.json.

    python -m deepspeed.launcher.launch --world_info=... --node_rank=N ... ds_launcher_worker.py OUT_DIR MODEL_DIR
"""

import argparse
import errno
import json
import os
import signal
from pathlib import Path

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "embedded.yaml"


def _stop_agreement(info) -> dict:
    from flashmorph.training.preemption import PreemptionGuard

    stopped_at = None
    with PreemptionGuard() as guard:
        for step in range(6):
            if info.rank == 1 and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this rank only
            if guard.stop_requested(info.device):
                stopped_at = step
                break
    return {"stopped_at": stopped_at, "received": guard.received}


def _full_disk_run(info, run_dir: Path, model_dir: Path, fail) -> dict:
    """Gate search that saves at steps 2, 4, 6, with `fail` armed: returns the error and what is left on disk."""
    from flashmorph.checkpoint import atomic
    from flashmorph.config import load_recipe
    from flashmorph.errors import CheckpointError, FlashMorphError
    from flashmorph.stages.gate_search import run_gate_search

    overrides = [f"model.path={model_dir}", f"run.run_dir={run_dir}", "search.steps=6", "search.save_every=2",
                 "search.keep_last=0", "search.micro_batch_size=2", "search.budget=1", "data.seq_len=64",
                 "data.num_pairs=4"]
    message = None
    with fail():
        try:
            run_gate_search(load_recipe(RECIPE, overrides), info, show_progress=False)
        except FlashMorphError as err:  # run_on_main re-raises rank 0's CheckpointError as its base type
            message = str(err)
    root = run_dir / "checkpoints"
    try:
        atomic.verify(root / "step_2", deep=True)
        step_2 = "intact"
    except CheckpointError as err:
        step_2 = str(err)
    return {"message": message, "left": sorted(p.name for p in root.iterdir()), "step_2": step_2,
            "gates_written": (run_dir / "gates.safetensors").exists()}


def _full_disk(info, out: Path, model_dir: Path) -> dict:
    import contextlib
    import json as json_module

    import torch

    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    @contextlib.contextmanager
    def rank1_torch_save_fails():
        real_save = torch.save  # what DeepSpeed's TorchCheckpointEngine calls for every rank file

        def save(obj, path, *args, **kwargs):
            if info.rank == 1 and ".tmp-step_4" in str(path):
                raise no_space
            return real_save(obj, path, *args, **kwargs)

        torch.save = save
        try:
            yield
        finally:
            torch.save = real_save

    @contextlib.contextmanager
    def rank0_manifest_fails():
        real_dump = json_module.dump  # what atomic.seal_directory writes the manifest with, on rank 0

        def dump(obj, fp, *args, **kwargs):
            if ".tmp-step_4" in str(getattr(fp, "name", "")):
                raise no_space
            return real_dump(obj, fp, *args, **kwargs)

        json_module.dump = dump
        try:
            yield
        finally:
            json_module.dump = real_dump

    return {"rank_write": _full_disk_run(info, out / "rank_write_run", model_dir, rank1_torch_save_fails),
            "manifest": _full_disk_run(info, out / "manifest_run", model_dir, rank0_manifest_fails)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int)  # deepspeed's launcher appends it
    parser.add_argument("out", type=Path)
    parser.add_argument("model", type=Path)
    args = parser.parse_args()
    report = {"env": {key: os.environ.get(key) for key in ENV_KEYS}, "local_rank_arg": args.local_rank}

    import torch

    from flashmorph.parallel import distributed

    with distributed.distributed_session() as info:
        report["info"] = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank}
        report["rank_sum"] = distributed.all_reduce_sum(torch.tensor([info.rank + 1.0])).item()
        report["stop"] = _stop_agreement(info)
        report["full_disk"] = _full_disk(info, args.out, args.model)
    (args.out / f"rank{report['info']['rank']}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
