"""Training pieces shared by the stages: losses, the distillation module, checkpoint/resume, preemption."""
