"""The cost curve reads a prefix of one gate search: the gates after n of its updates must be exactly the gates of
an n-step search (same data stream, constant lr, no schedule over the total step count)."""

import torch

from flashmorph.model.tiny import build_tiny_model, tiny_config
from helpers.multiproc import run_distributed


def _two_searches(info, model_dir, root):
    from flashmorph.config import GateSearchRecipe, ModelConfig, ParallelConfig, RunConfig, SearchConfig
    from flashmorph.data.config import DataConfig
    from flashmorph.experiments.searches import gate_history, gates_after
    from flashmorph.model.config import MorphConfig
    from flashmorph.stages.gate_search import run_gate_search

    out = {}
    for steps in (3, 6):
        recipe = GateSearchRecipe(
            run=RunConfig(run_dir=str(root / f"s{steps}")), model=ModelConfig(path=str(model_dir), dtype="float32"),
            morph=MorphConfig(linear_backend="naive"),
            data=DataConfig(tasks={"mqar": 1.0}, num_pairs=4, kv_separator=False, seq_len=18),
            search=SearchConfig(steps=steps, lr=0.1, micro_batch_size=8, budget=1, log_every=1, save_every=0),
            parallel=ParallelConfig(zero_stage=0))
        result = run_gate_search(recipe, info, show_progress=False)
        history = gate_history(root / f"s{steps}" / "tb", num_layers=3)
        record = {"settings": {"steps": steps}, "layer_scores": result.layer_scores.tolist(), "history": history}
        out[steps] = (result.layer_scores.tolist(), [gates_after(record, n) for n in range(1, steps + 1)], history)
    return out


def test_gates_after_n_updates_equal_an_n_step_search(tmp_path):
    model_dir = tmp_path / "model"
    build_tiny_model(tiny_config("llama", num_layers=3, hidden_size=32), seed=3).save_pretrained(model_dir)
    out = run_distributed(_two_searches, 1, model_dir, tmp_path)[0]
    final_3, _, _ = out[3]
    final_6, prefixes_6, history_6 = out[6]
    assert history_6["steps"] == [1, 2, 3, 4, 5, 6] and len(history_6["step_seconds"]) == 6
    assert not torch.allclose(torch.tensor(final_6), torch.full((3,), 0.88), atol=1e-3), "the gates did not move"
    # tensorboard stores float32, the gate file float32 too: equal to float32 rounding
    torch.testing.assert_close(torch.tensor(prefixes_6[2]), torch.tensor(final_3), rtol=0, atol=1e-6)
    assert prefixes_6[-1] == final_6
    assert prefixes_6[0] != prefixes_6[2]  # a prefix is really an earlier state, not the final one
