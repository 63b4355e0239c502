"""Generic file io used by every layer: atomic single-file writes, streaming safetensors, weights-only loads."""
