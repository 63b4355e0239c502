"""The parallel mesh: layouts and their one-line errors (no processes), then TP=2 x SP=2 on 4 gloo ranks
(tp_world.py runs them): group memberships, the mpu DeepSpeed reads, and where ZeRO-3 partitions and reduces."""

import pytest
import torch
from tp_world import four_rank_world

from flashmorph.config import LayoutConfig, ParallelConfig
from flashmorph.errors import ConfigError
from flashmorph.model.tiny import tiny_config
from flashmorph.model.shape import ModelShape
from flashmorph.parallel.layout import ParallelLayout, check_layout, layout_from_config, resolve_layout


def _one_line_config_error(fn, *needles):
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_resolve_layout_gives_data_parallel_the_rest():
    assert resolve_layout(2, 2, 8) == ParallelLayout(tensor=2, sequence=2, data=2)
    assert resolve_layout(1, 1, 3) == ParallelLayout(1, 1, 3)
    assert resolve_layout(4, 1, 4).world_size == 4


def test_resolve_layout_errors_name_the_fields_and_the_fix():
    _one_line_config_error(lambda: resolve_layout(4, 1, 6), "world_size=6", "parallel.tensor_parallel=4",
                           "parallel.sequence_parallel=1", "launch a multiple of 4 ranks")
    _one_line_config_error(lambda: resolve_layout(2, 2, 6), "parallel.sequence_parallel=2", "multiple of 4")
    _one_line_config_error(lambda: resolve_layout(0, 1, 4), "parallel.tensor_parallel=0", ">= 1")
    _one_line_config_error(lambda: resolve_layout(1, True, 4), "parallel.sequence_parallel=True")


def test_layout_from_config_prefers_the_per_world_size_layout():
    parallel = ParallelConfig(tensor_parallel=2, sequence_parallel=1, layouts={8: LayoutConfig(4, 2)})
    assert layout_from_config(parallel, 8) == ParallelLayout(4, 2, 1)
    assert layout_from_config(parallel, 4) == ParallelLayout(2, 1, 2)


def test_group_ranks_tp_innermost_then_sp_then_dp():
    layout = ParallelLayout(2, 2, 2)
    assert layout.coords(5) == (1, 0, 1)
    assert layout.group_ranks(5) == {"tp": [4, 5], "sp": [5, 7], "dp": [1, 5], "sdp": [1, 3, 5, 7]}
    assert sorted(layout.rank_of(*layout.coords(r)) for r in range(8)) == list(range(8))


@pytest.mark.parametrize("layout, shape, needles", [
    (ParallelLayout(2, 2, 1), dict(num_heads=6), ["parallel.tensor_parallel=2 x parallel.sequence_parallel=2",
                                                  "num_heads=6"]),
    (ParallelLayout(4, 1, 1), dict(num_heads=8), ["parallel.tensor_parallel=4 exceeds", "num_kv_heads=2"]),
    (ParallelLayout(2, 1, 1), dict(num_heads=6, num_kv_heads=3), ["parallel.tensor_parallel=2", "num_kv_heads=3"]),
    (ParallelLayout(2, 1, 1), dict(hidden_size=63), ["hidden_size=63"]),
    (ParallelLayout(2, 1, 1), dict(intermediate_size=129), ["intermediate_size=129"]),
    (ParallelLayout(1, 2, 1), dict(seq_len=15), ["parallel.sequence_parallel=2", "sequence length 15",
                                                 "data.seq_len"]),
])
def test_model_checks_name_the_field_and_the_fix(layout, shape, needles):
    sizes = dict(num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=128, seq_len=16) | shape
    seq_len = sizes.pop("seq_len")
    _one_line_config_error(lambda: check_layout(layout, _shape(**sizes), seq_len), *needles)


def _shape(num_heads, num_kv_heads, hidden_size, intermediate_size):
    return ModelShape("model", num_layers=2, hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=16, intermediate_size=intermediate_size, vocab_size=64)


def test_model_checks_accept_good_layouts_and_read_hf_configs():
    check_layout(ParallelLayout(2, 2, 1), _shape(4, 2, 64, 128), 16)
    check_layout(ParallelLayout(1, 4, 1), _shape(4, 2, 64, 128), None)
    _one_line_config_error(lambda: check_layout(ParallelLayout(4, 1, 1), ModelShape.from_config(tiny_config("llama"))),
                           "exceeds")


# ------------------------------------------------------------------------------------------ on 4 gloo ranks


@pytest.fixture(scope="module")
def ranks():
    results = [out["tp_sp"] for out in four_rank_world()]
    crashed = [out["crash"] for out in results if "crash" in out]
    assert not crashed, crashed[0]
    return results


def test_tp2_sp2_group_memberships(ranks):
    expected_tp = [[0, 1], [0, 1], [2, 3], [2, 3]]
    expected_sp = [[0, 2], [1, 3], [0, 2], [1, 3]]
    for rank, out in enumerate(ranks):
        assert out["coords"] == (rank % 2, rank // 2, 0)
        assert out["ranks"] == {"tp": expected_tp[rank], "sp": expected_sp[rank], "dp": [rank],
                                "sdp": expected_sp[rank]}
        assert out["group_sizes"] == {"tp": 2, "sp": 2, "dp": 1, "sdp": 2}


def test_mpu_answers_what_deepspeed_asks(ranks):
    for rank, out in enumerate(ranks):
        tp_rank, sp_rank = rank % 2, rank // 2
        assert out["mpu"] == {
            "tp": (2, tp_rank, rank - tp_rank),
            "mp": (2, tp_rank),
            "dp": (1, 0, [rank]),
            "sp": (2, sp_rank),
            "sdp": (2, sp_rank),
            "has_initialize_sequence_parallel": False,  # DeepSpeed would then ignore the TP group
        }


def test_zero3_partitions_and_adds_gradients_over_sp_x_dp(ranks):
    for rank, out in enumerate(ranks):
        assert out["engine"] == {"partition_ranks": out["ranks"]["sdp"], "seq_dp_ranks": out["ranks"]["sdp"],
                                 "dp_world_size": 1, "seq_dp_world_size": 2, "mp_world_size": 2, "sp_size": 2,
                                 "train_batch_size": 1}
        # rank r fed x = r + 1, so its gradient is r + 1; the SP ranks {0, 2} / {1, 3} combine theirs, and ZeRO-3
        # divides by the SP x DP group size (mesh.grad_divisor = 2), not by DP = 1
        partner = (rank + 2) % 4
        assert out["grad_divisor"] == 2
        expected = torch.full((1, 8), (rank + 1 + partner + 1) / out["grad_divisor"])
        torch.testing.assert_close(out["sp_grad"], expected)


def test_init_mesh_refuses_a_wrong_world_or_a_second_mesh(ranks):
    for out in ranks:
        assert out["wrong_world"].startswith("ConfigError")
        assert "covers 2 ranks but the world has 4" in out["wrong_world"]
        assert out["twice"].startswith("FlashMorphError") and "destroy_mesh()" in out["twice"]
