"""Shared fixtures: one builder of tiny models, and one helper that runs a function in N gloo processes."""

import os

import pytest
import torch

# at most 2 threads per test process, and no more than the cores left to each pytest-xdist worker
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture
def tiny_lm():
    """tiny_lm(family="llama", **shape) -> a random fp32 HF causal LM, seeded, in eval mode."""
    from flashmorph.model.tiny import build_tiny_model, tiny_config

    def build(family: str = "llama", seed: int = 0, **shape):
        return build_tiny_model(tiny_config(family, **shape), seed=seed)

    return build
