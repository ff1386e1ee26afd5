"""llama-server in its sandbox, supervised, behind the audited gateway."""
