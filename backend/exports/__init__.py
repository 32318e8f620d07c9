"""Export of a job's trained adapters for the operator."""
