"""Admission decisions for one route in one worker: how many sessions may be active at once.

Pure bookkeeping, no I/O: the acceptor asks ``full()`` before taking the next client from the
listen backlog, a session calls ``admit()`` when it starts and ``release()`` when it finishes.
While full, clients wait in the kernel's listen backlog (bounded by ``backlog``), never in an
unbounded queue in gconn.
"""


class Admission:
    """A route's active-session count in one worker against its share of max-connections."""

    __slots__ = ("limit", "active", "on_room")

    def __init__(self, limit, on_room=None):
        self.limit = limit  # this worker's share of the route's max-connections
        self.active = 0
        self.on_room = on_room  # called when a release makes room again after being full

    def full(self):
        """Whether a new session would exceed the limit."""
        return self.active >= self.limit

    def admit(self):
        """Count one more active session."""
        self.active += 1

    def release(self):
        """Count one session fewer; tell ``on_room`` when this turns full into not full."""
        self.active -= 1
        if self.active == self.limit - 1 and self.on_room is not None:
            self.on_room()
