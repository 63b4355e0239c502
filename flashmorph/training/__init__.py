"""Training pieces shared by the stages: the one training loop, losses, the distillation module, checkpoint/resume,
preemption."""
