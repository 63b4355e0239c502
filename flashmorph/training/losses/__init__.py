"""The stages' losses: answer-token retrieval CE and the gate regularizer (retrieval), tiled KL/CE (distill)."""
