"""Append-only audit log: who did what, when, on which object."""
