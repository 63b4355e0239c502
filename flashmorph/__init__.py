"""flashmorph: morph a pretrained Transformer into a hybrid softmax/linear-attention model."""

__version__ = "0.1.0"


def __getattr__(name):
    # lazy, so that `import flashmorph` (e.g. for __version__) does not import torch and transformers
    if name == "load_hybrid":
        from flashmorph.export import load_hybrid

        return load_hybrid
    raise AttributeError(f"module 'flashmorph' has no attribute {name!r}")
