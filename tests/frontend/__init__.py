"""Browser tests of the dashboard (`frontend/`)."""
