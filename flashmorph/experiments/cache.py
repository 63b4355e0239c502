"""Each part of the experiment caches its result as <out_dir>/parts/<part>.json, so a second call continues where the
first stopped; a deadline stops the run between units of work, never inside one."""

import json
import time
from pathlib import Path

from flashmorph.io.atomic import atomic_write_text

PARTS_DIR = "parts"


class PartCache:
    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir) / PARTS_DIR

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str) -> dict | None:
        return json.loads(self.path(name).read_text()) if self.has(name) else None

    def save(self, name: str, data: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(name), json.dumps(data, indent=1))


class DeadlineReached(Exception):
    """Raised between units of work once the call's time is up; what finished is cached, a rerun continues."""


class Deadline:
    def __init__(self, minutes: float | None):
        self.started = time.perf_counter()
        self.limit = None if minutes is None else 60.0 * minutes

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def check(self, before: str) -> None:
        if self.limit is not None and self.elapsed() > self.limit:
            raise DeadlineReached(f"time limit reached after {self.elapsed():.0f} s, before {before}")
