"""A worker's live connections: a dict keyed by connection id.

Insert and remove are O(1) on the data path; the registry is walked only to answer an admin
request or write a summary, never to find work (the event loop finds work: 389 DS's lesson).
"""

import itertools


class Registry:
    """The live connections of one worker process, by id."""

    def __init__(self, worker_id=0):
        self.worker_id = worker_id
        self.connections = {}  # connection id -> ConnectionContext
        self._ids = itertools.count(1)

    def next_id(self):
        """A new connection id, unique in this worker (and across workers by its prefix)."""
        number = next(self._ids)
        return f"{self.worker_id}-{number}" if self.worker_id else str(number)

    def add(self, context):
        """Register a live connection."""
        self.connections[context.id] = context

    def remove(self, context):
        """Forget a finished connection; a second remove is harmless."""
        self.connections.pop(context.id, None)

    def __len__(self):
        return len(self.connections)

    def snapshot(self):
        """A list of every live connection's admin view (walks the registry: admin only)."""
        return [context.as_dict() for context in list(self.connections.values())]
