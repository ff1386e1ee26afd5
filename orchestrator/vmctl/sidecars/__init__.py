"""Processes that run on their own beside a guest or client; foundations only."""
