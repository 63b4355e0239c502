"""Kernel-level ops of the linear branch: `gla/` (gated linear attention: naive, chunked, fla, one dispatch) and
`liger` (the Liger feature map and forget gate built from a layer's own q/k/v)."""
