"""FL-GLM core: model splitting, adapters, trainers and the secure wire format shared by worker and agent."""

__version__ = "0.1.0"
