"""Per-step training metrics reported by agents, and job artifacts (checkpoints, adapters)."""
