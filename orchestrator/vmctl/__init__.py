"""vmctl: run coding agents against local models without trusting either."""

__version__ = "0.1.0"
