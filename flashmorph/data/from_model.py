"""Pick the token space and haystack for a model directory: its tokenizer if it has one, else synthetic ids."""

import functools
import logging
from pathlib import Path

from flashmorph.data.config import DataConfig
from flashmorph.data.haystack import Haystack
from flashmorph.data.token_space import TokenSpace

log = logging.getLogger(__name__)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@functools.cache  # once per model, not once per sequence length of a schedule
def _note_synthetic(model_dir: str, vocab_size: int) -> None:
    log.info("%s has no tokenizer (%s): data uses a synthetic token space of the model's %d ids", model_dir,
             ", ".join(_TOKENIZER_FILES), vocab_size)


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def data_for_model(model_dir: str | Path, cfg: DataConfig, vocab_size: int) -> tuple[TokenSpace, Haystack | None]:
    """The token space (from the model's tokenizer, or the synthetic one for tokenizer-less tiny models)
    and, for haystack="text", the corpus haystack tokenized with that tokenizer."""
    if not has_tokenizer(model_dir):
        if cfg.haystack == "text":
            from flashmorph.errors import ConfigError

            raise ConfigError(f"data.haystack=text needs a tokenizer, and {model_dir} has none; use data.haystack=vocab")
        _note_synthetic(str(model_dir), vocab_size)
        return TokenSpace.synthetic(vocab_size), None
    tokenizer = load_tokenizer(model_dir)
    space = TokenSpace.from_tokenizer(tokenizer)
    haystack = Haystack.from_text_files(cfg.text_files, tokenizer, cfg.text_field) if cfg.haystack == "text" else None
    return space, haystack
