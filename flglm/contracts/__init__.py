"""The torch-free contracts shared by the backend, the worker and the agent: tasks, refusals, blobs, specs."""
