"""Training: the recipe object (setup steps + loop), its step, schedule and checkpoints."""
