"""Settings of the synthetic retrieval data (task mix, lengths, haystack) and their validation."""

import codecs
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flashmorph.errors import ConfigError, check_choice

if TYPE_CHECKING:  # token_space pulls in torch; configs stay importable (and YAML-checkable) without it
    from flashmorph.data.token_space import TokenSpace

TASK_NAMES = ("mqar", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
HAYSTACKS = ("vocab", "text")
# local file suffix -> datasets packaged builder; nothing else is loaded, so nothing is fetched from the hub
TEXT_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# the knob that sets how much content a task has: named in "seq_len too short" messages as the fix
_SIZE_FIELD = {
    "mqar": "data.num_pairs",
    "niah_single": "data.value_len",
    "niah_multikey": "data.num_pairs",
    "niah_multivalue": "data.num_values",
    "variable_tracking": "data.chain_len",
}


@dataclass
class DataConfig:
    tasks: dict[str, float] = field(default_factory=lambda: {"mqar": 1.0})  # task name -> sampling weight (> 0)
    seq_len: int = 256  # exact number of tokens of every sample, BOS included
    num_pairs: int = 8  # mqar key/value pairs; also the number of needles (asked one + distractors) in niah_multikey
    num_queries: int = 0  # mqar queries per sample; 0 = ask every pair
    value_len: int = 1  # tokens per value
    num_values: int = 4  # needles (one value each) under the single key of niah_multivalue
    kv_separator: bool = True  # mqar pairs as `k SEP v` (True) or Zoology's plain `k v` (False)
    chain_len: int = 4  # variable_tracking: assignments (hops) in the asked chain and in the distractor chain
    haystack: str = "vocab"  # filler between the content: "vocab" (random filler ids) or "text" (a local corpus)
    text_files: list[str] = field(default_factory=list)  # local .txt/.jsonl/.json/.parquet files for haystack="text"
    text_field: str = "text"  # column holding the text in .jsonl/.json/.parquet files
    seed: int = 0  # with the split and the item index, fixes every sample

    @property
    def queries_per_sample(self) -> int:
        return self.num_queries or self.num_pairs

    def min_seq_len(self, task: str) -> int:
        """Tokens `task` needs with no filler at all; a sample of exactly this length has an empty haystack."""
        vl = self.value_len
        if task == "mqar":  # BOS, P x (k [SEP] v), QUERY, Q x (q [SEP] a)
            width = (2 if self.kv_separator else 1) + vl
            return 1 + self.num_pairs * width + 1 + self.queries_per_sample * width
        if task == "niah_single":  # BOS, NEEDLE k SEP v, QUERY k SEP v
            return 1 + (3 + vl) + (3 + vl)
        if task == "niah_multikey":  # BOS, P x (NEEDLE k SEP v), QUERY k SEP v
            return 1 + self.num_pairs * (3 + vl) + (3 + vl)
        if task == "niah_multivalue":  # BOS, N x (NEEDLE k SEP v), QUERY k SEP v1..vN
            return 1 + self.num_values * (3 + vl) + 3 + self.num_values * vl
        if task == "variable_tracking":
            # BOS, 2 chains of (NEEDLE x ASSIGN v) + (C-1) x (NEEDLE x ASSIGN x'), QUERY v SEP x1..xC
            chain = (3 + vl) + 4 * (self.chain_len - 1)
            return 1 + 2 * chain + 1 + vl + 1 + self.chain_len
        raise ConfigError(f"data.tasks has unknown task {task!r}; use any of {TASK_NAMES}")

    def pool_needs(self, task: str) -> tuple[int, int]:
        """(distinct key ids, distinct value ids) one sample of `task` draws."""
        return {
            "mqar": (self.num_pairs, 1),  # keys distinct within a sample; values may repeat
            "niah_single": (1, 1),
            "niah_multikey": (self.num_pairs, 1),
            "niah_multivalue": (1, self.num_values),  # values differ in their first token
            "variable_tracking": (2 * self.chain_len, 2),  # two chains of distinct variables, two distinct values
        }[task]

    def validate(self, vocab_size: int | None = None, space: "TokenSpace | None" = None) -> None:
        """Raise ConfigError naming the field and the fix. Pools are checked against `space` if
        given, else against TokenSpace.synthetic(vocab_size) if vocab_size is given."""
        if not isinstance(self.tasks, dict) or not self.tasks:
            raise ConfigError(
                f"data.tasks={self.tasks!r} must be a non-empty mapping task -> weight, e.g. {{'mqar': 1.0}}"
            )
        for task, weight in self.tasks.items():
            if task not in TASK_NAMES:
                raise ConfigError(f"data.tasks has unknown task {task!r}; use any of {TASK_NAMES}")
            if not isinstance(weight, (int, float)) or not weight > 0:
                raise ConfigError(
                    f"data.tasks[{task!r}]={weight!r} must be a positive weight; drop the task to disable it"
                )
        for name in ("num_pairs", "value_len", "num_values", "chain_len", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.num_queries < 0:
            raise ConfigError(f"data.num_queries={self.num_queries} must be >= 0 (0 asks every pair)")
        if self.num_queries > self.num_pairs:
            raise ConfigError(
                f"data.num_queries={self.num_queries} exceeds data.num_pairs={self.num_pairs}; "
                "lower data.num_queries (keys are asked at most once)"
            )
        if self.seed < 0:
            raise ConfigError(f"data.seed={self.seed} must be >= 0")
        for task in self.tasks:
            need = self.min_seq_len(task)
            if self.seq_len < need:
                raise ConfigError(
                    f"data.seq_len={self.seq_len} is too short for task {task} (needs >= {need}); "
                    f"raise data.seq_len or lower {_SIZE_FIELD[task]}"
                )
        self._validate_haystack()
        if space is None and vocab_size is not None:
            from flashmorph.data.token_space import TokenSpace

            space = TokenSpace.synthetic(vocab_size)
        if space is not None:
            self._validate_pools(space)

    def _validate_haystack(self) -> None:
        check_choice("data.haystack", self.haystack, HAYSTACKS)
        if self.haystack == "text":
            text_builder(self.text_files)

    def _validate_pools(self, space: "TokenSpace") -> None:
        for task in self.tasks:
            need_keys, need_values = self.pool_needs(task)
            if need_keys > len(space.key_ids):
                raise ConfigError(
                    f"{_SIZE_FIELD[task]}: task {task} needs {need_keys} distinct key ids but the vocabulary offers "
                    f"{len(space.key_ids)}; lower {_SIZE_FIELD[task]} or use a larger vocabulary"
                )
            if need_values > len(space.value_ids):
                raise ConfigError(
                    f"{_SIZE_FIELD[task]}: task {task} needs {need_values} distinct value ids but the vocabulary "
                    f"offers {len(space.value_ids)}; lower {_SIZE_FIELD[task]} or use a larger vocabulary"
                )
        if self.haystack == "vocab" and len(space.filler_ids) == 0:
            raise ConfigError(
                "data.haystack=vocab needs filler ids but the token space has none; use data.haystack=text"
            )


def text_builder(files: list[str]) -> str:
    """The `datasets` packaged builder ("text", "json" or "parquet") for local corpus files, after checking them."""
    if not files:
        raise ConfigError("data.haystack=text needs data.text_files (local .txt/.jsonl/.json/.parquet files)")
    builders = set()
    for path in files:
        suffix = Path(path).suffix.lower()
        if suffix not in TEXT_BUILDERS:
            raise ConfigError(
                f"data.text_files entry {path!r} has an unsupported suffix; use one of {tuple(TEXT_BUILDERS)}"
            )
        if not Path(path).is_file():
            raise ConfigError(f"data.text_files entry {path!r} does not exist; fix the path")
        builders.add(TEXT_BUILDERS[suffix])
    if len(builders) > 1:
        raise ConfigError(f"data.text_files mixes formats {sorted(builders)}; use files of one format")
    check_text_contents(files, "data.text_files")
    return builders.pop()


_TEXT_CHECK_BYTES = 256 << 20  # per file: a bad byte further in is found by the loader, after the run dir exists


def check_text_contents(files: list[str], field: str) -> None:
    """Refuse a corpus that cannot be used, before anything is written: a .txt/.json/.jsonl file that is not UTF-8
    (checked over its first 256 MiB), or files that together hold no text at all (empty or blank). Parquet files are
    binary and read by `datasets` later."""
    any_text = False
    for path in files:
        if Path(path).suffix.lower() == ".parquet":
            any_text = True  # its rows are only known once datasets reads it
            continue
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        try:
            with open(path, "rb") as f:
                while offset < _TEXT_CHECK_BYTES and (chunk := f.read(1 << 20)):
                    any_text = any_text or bool(decoder.decode(chunk).strip())
                    offset += len(chunk)
                if offset < _TEXT_CHECK_BYTES:
                    decoder.decode(b"", final=True)  # a multi-byte character cut off at the end
        except UnicodeDecodeError as err:
            raise ConfigError(f"{field} entry {path!r} is not UTF-8 (bad byte near offset {offset + err.start}); "
                              "re-encode it as UTF-8, e.g. iconv -t UTF-8") from None
        except OSError as err:
            raise ConfigError(f"{field} entry {path!r} is unreadable ({err.strerror or err}); fix its permissions") from None
    if not any_text:
        raise ConfigError(f"{field} {list(files)} hold no text (empty or blank files); give a non-empty corpus")
