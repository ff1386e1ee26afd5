"""Fake peers for fast tests: the hub, QEMU's QMP monitor, a stand-in guest and llama-server.

They fake the other side of a wire (HTTP, a QMP socket, a FIFO pair) and
leave vmctl's own code unchanged, so a test drives the real client.
"""
