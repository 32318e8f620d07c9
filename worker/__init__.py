"""Celery GPU worker: runs the server body of split models, batching and replicas."""
