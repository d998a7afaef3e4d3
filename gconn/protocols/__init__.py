"""Protocol steps a connection's greenlet runs before forwarding: one module per protocol.

Each module is a pure parse/build half (bytes in, values out, tested without sockets) that the
session's greenlet calls while it reads and writes.  Protocol steps never import the session.
"""
