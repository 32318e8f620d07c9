"""Principals: operator API tokens with roles and client-agent credentials, all stored as SHA-256 hashes."""
