"""undo_rope inverts the model's own rotary embedding, including scaled (Llama-3, YaRN) variants."""

import pytest
import torch

from flashmorph.model.rope import apply_rope, undo_rope
from flashmorph.model.tiny import build_tiny_model, tiny_config


@pytest.mark.parametrize("rope_parameters", [
    None,
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096},
])
def test_undo_rope_recovers_the_projection_at_large_positions(rope_parameters):
    config = tiny_config("llama", num_layers=1)
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    rotary = build_tiny_model(config).model.rotary_emb
    x = torch.randn(2, 4, 16, 16)  # [B, H, T, D]
    positions = torch.arange(100_000, 100_016).unsqueeze(0).expand(2, -1)
    cos, sin = rotary(x, positions)
    recovered = undo_rope(apply_rope(x, cos, sin), cos, sin)
    assert recovered.dtype == torch.float32
    torch.testing.assert_close(recovered, x, rtol=0, atol=5e-6)
