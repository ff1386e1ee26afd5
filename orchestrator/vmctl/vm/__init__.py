"""The guest side of vmctl: QEMU, its instance lifecycle and what wraps it."""
