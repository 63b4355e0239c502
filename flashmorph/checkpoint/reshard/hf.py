"""Consolidated HF safetensors as transformers writes them: `model.safetensors`, or numbered shards plus
`model.safetensors.index.json`; read and written one tensor at a time."""

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from flashmorph.errors import CheckpointError, ConfigError
from flashmorph.io.safetensors import SafetensorsFile, StreamingSafetensorsWriter, nbytes

log = logging.getLogger(__name__)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in '5GB' / '500MiB' / 1000 (transformers' max_shard_size spelling)."""
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number):]
        try:
            value = int(float(number) * _UNITS[unit])
        except (ValueError, KeyError):
            raise ConfigError(f"--max-shard-size {size!r} is not a size; write e.g. 5GB or 500MB") from None
    if value < 1:
        raise ConfigError(f"--max-shard-size must be positive, got {size!r}")
    return value


def hf_weight_files(hf_dir: Path) -> list[str]:
    """The safetensors files of a HF directory, from its index when sharded; CheckpointError when there are none."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is unreadable ({err!r}); re-create the HF checkpoint") from err
        return sorted(set(weight_map.values()))
    if (hf_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise CheckpointError(f"{hf_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}; point --src at a HF model directory")


class HFSource:
    """The tensors of a HF safetensors directory, by HF name; every file's header is checked on open."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._files = {name: SafetensorsFile(self.dir / name) for name in hf_weight_files(self.dir)}
        self._where, self.specs = {}, {}
        for file_name, handle in self._files.items():
            for name, spec in handle.specs.items():
                if name in self._where:
                    raise CheckpointError(f"{self.dir}: tensor {name} is in both {self._where[name]} and {file_name}")
                self._where[name] = file_name
                self.specs[name] = spec
        index = self.dir / INDEX_FILE
        if index.is_file():
            for name, file_name in json.loads(index.read_text())["weight_map"].items():
                if self._where.get(name) != file_name:
                    raise CheckpointError(f"{index} puts {name} in {file_name}, but that file does not hold it; "
                                          "the checkpoint is incomplete")

    def get(self, name: str):
        return self._files[self._where[name]].get(name)


def plan_shards(specs: dict, max_shard_bytes: int) -> list[dict]:
    """Consecutive groups of tensors of at most max_shard_bytes each (a bigger tensor gets a file of its own)."""
    shards, current, current_bytes = [], {}, 0
    for name, (shape, dtype) in specs.items():
        size = nbytes(shape, dtype)
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = (shape, dtype)
        current_bytes += size
    if current or not shards:
        shards.append(current)
    return shards


def write_hf(source, names: list[str], out_dir: Path, max_shard_size: int | str = "5GB",
             show_progress: bool = True) -> dict[str, dict]:
    """Write `names` (in order) from `source` (.specs, .get) as HF safetensors into out_dir; returns {file: plan}.

    Peak memory: the tensor being written (plus whatever `source.get` needs to build it).
    """
    shards = plan_shards({name: source.specs[name] for name in names}, parse_size(max_shard_size))
    if len(shards) == 1:
        files = {SINGLE_FILE: shards[0]}
    else:
        files = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": plan for i, plan in enumerate(shards)}
    bar = tqdm(total=len(names), desc="writing HF safetensors", unit="tensor", disable=not show_progress)
    for file_name, plan in files.items():
        with StreamingSafetensorsWriter(out_dir / file_name, plan, metadata={"format": "pt"}) as writer:
            for name in plan:
                writer.write(name, source.get(name))
                bar.update()
    bar.close()
    if len(files) > 1:
        total_size = sum(nbytes(*spec) for plan in files.values() for spec in plan.values())
        total_params = sum(nbytes(shape, dtype) // nbytes((), dtype) for plan in files.values()
                           for shape, dtype in plan.values())
        index = {"metadata": {"total_parameters": total_params, "total_size": total_size},
                 "weight_map": {name: file_name for file_name, plan in files.items() for name in plan}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files
