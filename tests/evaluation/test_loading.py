"""Model loading: a flashmorph hybrid export loads as the hybrid (same recall as in memory), a plain dir as itself."""

import pytest
import torch

from flashmorph.data import DataConfig, TokenSpace
from flashmorph.errors import ConfigError
from flashmorph.evaluation import RetrievalEvalConfig, evaluate_retrieval, load_eval_model
from flashmorph.evaluation.loading import is_hybrid_export, read_model_config

CFG = RetrievalEvalConfig(tasks=["mqar"], lengths=[40], samples=4, batch_size=4, data=DataConfig(num_pairs=2))


def recall(model) -> list:
    return evaluate_retrieval(model, TokenSpace.synthetic(64), CFG, show_progress=False)["cells"]


def test_hybrid_export_loads_as_the_hybrid(tmp_path, bare_model_dir):
    export = pytest.importorskip("flashmorph.export", reason="hybrid export not available in this checkout")
    from flashmorph.model.hybrid import apply_hybrid_layout

    hybrid = apply_hybrid_layout(load_eval_model(bare_model_dir, "float32"), ["full", "linear"])
    export.save_hybrid(hybrid, tmp_path / "hybrid")
    assert is_hybrid_export(read_model_config(tmp_path / "hybrid"))
    loaded = load_eval_model(tmp_path / "hybrid", "float32")
    assert loaded.config.flashmorph["layer_types"] == ["full", "linear"]
    assert recall(loaded) == recall(hybrid)
    ids = torch.randint(6, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
        assert torch.allclose(logits, hybrid(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(logits, load_eval_model(bare_model_dir, "float32")(input_ids=ids).logits, atol=1e-3)


def test_plain_dir_and_errors(tmp_path, bare_model_dir, tiny_model):
    assert not is_hybrid_export(read_model_config(bare_model_dir))
    assert recall(load_eval_model(bare_model_dir, "float32")) == recall(tiny_model)
    with pytest.raises(ConfigError, match="no config.json"):
        load_eval_model(tmp_path)
    with pytest.raises(ConfigError, match="--device"):
        load_eval_model(bare_model_dir, device="cuda:0" if not torch.cuda.is_available() else "tpu")
