"""Agent clients run on the host, each in its sandbox with a private state folder."""
