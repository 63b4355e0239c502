"""A world of one (a plain `python launcher/x.py`, or a stage run inside a test or notebook) leaves the environment
as it found it: a launcher started later from the same process must not inherit RANK or a stale MASTER_PORT."""

import os

from flashmorph.parallel.distributed import distributed_session

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_a_world_of_one_gives_back_the_environment(monkeypatch):
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # a value the user set stays, before and after
    with distributed_session() as info:
        assert (info.rank, info.world_size) == (0, 1)
        assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"]
    assert {key: os.environ.get(key) for key in KEYS} == {"RANK": None, "LOCAL_RANK": None, "WORLD_SIZE": None,
                                                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None}
