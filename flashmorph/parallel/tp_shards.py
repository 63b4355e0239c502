"""Megatron-core tensor-parallel shards: one safetensors file per TP rank holding that rank's partitions, plus
`tp_layout.json` (TP size, model sizes, and per weight its HF name, kind, split dim and full shape)."""

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flashmorph.errors import CheckpointError
from flashmorph.io.safetensors import SafetensorsFile, StreamingSafetensorsWriter
from flashmorph.model.shape import ModelShape
from flashmorph.parallel import tp_rules

LAYOUT_FILE = "tp_layout.json"
LAYOUT_FORMAT = 1


def rank_file(rank: int, tp: int) -> str:
    return f"tp_rank_{rank:02d}_of_{tp:02d}.safetensors"


def write_tp(source, names: list[str], out_dir: Path, tp: int, dims: ModelShape,
             show_progress: bool = True) -> dict:
    """Split every tensor of `source` into its TP pieces and stream piece r into rank r's file; returns the layout.

    Peak memory: one full tensor plus its TP pieces (pieces cut on dim 0 are views, so at most one more copy).
    """
    tp_rules.check_tp_size(dims, tp)
    entries, plans = {}, [{} for _ in range(tp)]
    for name in names:
        shape, dtype = source.specs[name]
        rule = tp_rules.tp_rule(name)
        tp_rules.check_split_shape(name, shape, rule, dims, tp)
        tp_name = tp_rules.hf_to_tp_name(name)
        entries[tp_name] = {"hf_name": name, "kind": rule.kind, "split_dim": rule.split_dim,
                            "shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
        for plan in plans:
            plan[tp_name] = (tp_rules.tp_piece_shape(shape, rule, tp), dtype)
    files = [rank_file(rank, tp) for rank in range(tp)]
    writers = [StreamingSafetensorsWriter(out_dir / files[rank], plans[rank],
                                          metadata={"format": "pt", "tp_rank": str(rank), "tp_size": str(tp)})
               for rank in range(tp)]
    try:
        for name in tqdm(names, desc=f"writing TP={tp} shards", unit="tensor", disable=not show_progress):
            pieces = tp_rules.split_for_tp(source.get(name), tp_rules.tp_rule(name), tp)
            for writer, piece in zip(writers, pieces):
                writer.write(tp_rules.hf_to_tp_name(name), piece)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        writer.close()
    layout = {"format": LAYOUT_FORMAT, "tp_size": tp, "files": files, "dims": tp_rules.layout_dims(dims),
              "tensors": entries}
    (out_dir / LAYOUT_FILE).write_text(json.dumps(layout, indent=1) + "\n")
    return layout


def read_layout(tp_dir: Path) -> dict:
    path = tp_dir / LAYOUT_FILE
    if not path.is_file():
        raise CheckpointError(f"{tp_dir} holds no {LAYOUT_FILE}; point --src at a directory written by reshard --to tp")
    try:
        layout = json.loads(path.read_text())
        fmt, tp, files, tensors = layout["format"], layout["tp_size"], layout["files"], layout["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is unreadable ({err!r}); re-create the TP shards") from err
    if fmt != LAYOUT_FORMAT or len(files) != tp or not tensors:
        raise CheckpointError(f"{path} has format {fmt!r} with {len(files)} files for tp_size {tp}; "
                              f"this flashmorph reads format {LAYOUT_FORMAT} with one file per rank")
    return layout


class TPSource:
    """Full HF tensors rebuilt from TP shards: each read gathers one weight's pieces from every rank file."""

    def __init__(self, tp_dir: str | Path):
        self.dir = Path(tp_dir)
        self.layout = read_layout(self.dir)
        self.tp = self.layout["tp_size"]
        self._ranks = [SafetensorsFile(self.dir / name) for name in self.layout["files"]]
        self._entries = {entry["hf_name"]: (tp_name, entry) for tp_name, entry in self.layout["tensors"].items()}
        self.specs = {}
        for hf_name, (tp_name, entry) in self._entries.items():
            rule = tp_rules.tp_rule(hf_name)
            if (rule.kind, rule.split_dim) != (entry["kind"], entry["split_dim"]):
                raise CheckpointError(f"{LAYOUT_FILE} splits {hf_name} as {entry['kind']} on dim "
                                      f"{entry['split_dim']}, this flashmorph as {rule.kind} on dim {rule.split_dim}")
            shape, dtype = tuple(entry["shape"]), getattr(torch, str(entry["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"{LAYOUT_FILE} gives {hf_name} the unknown dtype {entry['dtype']!r}")
            piece = (tp_rules.tp_piece_shape(shape, rule, self.tp), dtype)
            for handle in self._ranks:
                if handle.specs.get(tp_name) != piece:
                    raise CheckpointError(f"{handle.path} holds {tp_name} as {handle.specs.get(tp_name)}, "
                                          f"{LAYOUT_FILE} says {piece}; the TP shards are inconsistent")
            self.specs[hf_name] = (shape, dtype)
        for handle in self._ranks:
            extra = set(handle.specs) - {tp_name for tp_name, _ in self._entries.values()}
            if extra:
                raise CheckpointError(f"{handle.path} holds {sorted(extra)[0]}, which {LAYOUT_FILE} does not list")

    def get(self, name: str) -> torch.Tensor:
        tp_name, _ = self._entries[name]
        pieces = [handle.get(tp_name) for handle in self._ranks]
        return tp_rules.merge_from_tp(pieces, tp_rules.tp_rule(name), name)
