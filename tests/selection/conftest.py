"""Fixtures of the selection tests: small held-out retrieval batches the tiny models can be scored on."""

import pytest


@pytest.fixture(scope="session")
def heldout():
    """2 batches x 4 MQAR samples of 64 tokens over the synthetic 64-token vocabulary of the tiny models."""
    from flashmorph.data import DataConfig, RetrievalDataset, TokenSpace
    from flashmorph.selection import SELECTION_SPLIT, heldout_batches

    cfg = DataConfig(tasks={"mqar": 1.0}, seq_len=64, num_pairs=4)
    dataset = RetrievalDataset(cfg, TokenSpace.synthetic(64), split=SELECTION_SPLIT)
    return heldout_batches(dataset, num_batches=2, batch_size=4)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box two spinning threads make each
    forward pass up to 10x slower; the previous setting comes back after every test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
