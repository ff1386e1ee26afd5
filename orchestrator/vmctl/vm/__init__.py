"""One QEMU guest: its spec, accelerator, command line, QMP, console and exec channel."""
