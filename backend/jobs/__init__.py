"""Jobs: submission, invitations and consent, the lifecycle state machine, and rounds."""
