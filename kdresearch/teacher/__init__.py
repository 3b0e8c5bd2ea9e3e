"""A distillation run's teacher: where its weights come from, and its outputs (online, cached, per view)."""
