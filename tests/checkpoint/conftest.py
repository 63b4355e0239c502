"""One real two-step gate-search run, shared by the checkpoint tests that damage copies of it."""

import pytest

from flashmorph.model.tiny import build_tiny_model, tiny_config
from helpers.gate_search_cli import gate_search_cli


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A real two-step gate search (one process, ZeRO-3 on CPU) with checkpoints at steps 1 and 2."""
    root = tmp_path_factory.mktemp("finished_run")
    build_tiny_model(tiny_config("llama", num_layers=2), seed=7).save_pretrained(root / "model")
    done = gate_search_cli(root / "model", root / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    return root
