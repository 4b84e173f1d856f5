"""Sans-io protocols: the handoff protocol and the control protocol.

Bytes and fd counts in, events out; events in, bytes out. Nothing here opens, reads, writes or
closes a socket or an fd, and nothing reads a clock. The I/O layer (scm.py, handoff.py,
daemon.py, client.py) decides when to call what; this package decides what is valid.
"""
