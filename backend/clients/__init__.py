"""Client agents: enrollment with one-time tokens, heartbeats and leases, revocation."""
