"""Settings of the natural-text part of the distillation / long-context data (`text:` in a recipe) and their checks."""

from dataclasses import dataclass, field
from pathlib import Path

from flashmorph.data.config import TEXT_BUILDERS, check_text_contents
from flashmorph.errors import ConfigError, check_choice

# text.format -> datasets packaged builder; "auto" picks it from the file suffix (TEXT_BUILDERS)
FORMAT_BUILDERS = {"json": "json", "jsonl": "json", "text": "text", "parquet": "parquet"}
TEXT_FORMATS = ("auto", *FORMAT_BUILDERS)


@dataclass
class TextDataConfig:
    files: list[str] = field(default_factory=list)  # local corpus files; document = a .txt file or a json/parquet row
    format: str = "auto"  # "json" | "jsonl" | "text" | "parquet", or "auto" (from each file's suffix)
    text_field: str = "text"  # column holding the document text in json/jsonl/parquet files
    weight: float = 0.0  # share of text samples in the mixture with synthetic retrieval, in [0, 1]; 0 = no text
    cache_dir: str | None = None  # datasets cache for the parsed and tokenized corpus; null = datasets' default
    max_documents: int | None = None  # use only the first N documents (file order); null = all
    toy_corpus: bool = False  # no files: generate a toy corpus from Python's stdlib docstrings (embedded CPU default)
    seed: int = 0  # with the sample index, fixes which packed window a sample is (and the mixture's source choice)

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix; files are checked only when text is used (weight > 0)."""
        if not isinstance(self.weight, (int, float)) or not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"text.weight={self.weight!r} must lie in [0, 1] (the share of text samples)")
        check_choice("text.format", self.format, TEXT_FORMATS)
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError(f"text.text_field={self.text_field!r} must name the column holding the text")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"text.max_documents={self.max_documents} must be >= 1 (or null for all documents)")
        if self.seed < 0:
            raise ConfigError(f"text.seed={self.seed} must be >= 0")
        if self.toy_corpus and self.files:
            raise ConfigError("text.toy_corpus=true and text.files are both set; clear one of them")
        if self.weight > 0 and not self.toy_corpus:
            self.builder()

    def builder(self) -> str:
        """The `datasets` packaged builder of `files` ("json", "text" or "parquet"), after checking that they exist."""
        if not self.files:
            raise ConfigError(
                "text.files is empty; list local .txt/.jsonl/.json/.parquet files, set text.toy_corpus=true, "
                "or set text.weight=0"
            )
        builders = set()
        for path in self.files:
            if self.format == "auto":
                suffix = Path(path).suffix.lower()
                if suffix not in TEXT_BUILDERS:
                    raise ConfigError(
                        f"text.files entry {path!r} has an unknown suffix; set text.format or use one of "
                        f"{tuple(TEXT_BUILDERS)}"
                    )
                builders.add(TEXT_BUILDERS[suffix])
            if not Path(path).is_file():
                raise ConfigError(f"text.files entry {path!r} does not exist; fix the path")
        check_text_contents(self.files, "text.files")
        if self.format != "auto":
            return FORMAT_BUILDERS[self.format]
        if len(builders) > 1:
            raise ConfigError(f"text.files mixes formats {sorted(builders)}; use files of one format")
        return builders.pop()
