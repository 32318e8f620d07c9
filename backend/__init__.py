"""FastAPI control plane: jobs, rounds, clients, metrics, audit; serves the dashboard."""
