"""flashmorph: morph a pretrained Transformer into a hybrid softmax/linear-attention model."""

__version__ = "0.1.0"
