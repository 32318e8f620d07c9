"""Privacy audits of jobs: what a curious server could recover of the training text, per job setting."""
