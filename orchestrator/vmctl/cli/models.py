"""Placeholder until its verbs land."""
