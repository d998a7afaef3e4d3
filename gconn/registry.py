"""A worker's live sessions: a dict keyed by connection id.

Insert and remove are O(1) on the data path; the registry is walked only to answer an admin
request, write a summary or end what is left at shutdown, never to find work (the event loop
finds work: 389 DS's lesson).
"""

import itertools

from gevent.event import Event


class Registry:
    """The live sessions of one worker process, by connection id."""

    def __init__(self, worker_id=0):
        self.worker_id = worker_id
        self.sessions = {}  # connection id -> Session (its .context is the admin's view)
        self.empty = Event()  # set while no session is live
        self.empty.set()
        self._ids = itertools.count(1)

    def next_id(self):
        """A new connection id, unique in this worker (and across workers by its prefix)."""
        number = next(self._ids)
        return f"{self.worker_id}-{number}" if self.worker_id else str(number)

    def add(self, session):
        """Register a live session."""
        self.sessions[session.context.id] = session
        self.empty.clear()

    def remove(self, session):
        """Forget a finished session; a second remove is harmless."""
        self.sessions.pop(session.context.id, None)
        if not self.sessions:
            self.empty.set()

    def __len__(self):
        return len(self.sessions)

    def snapshot(self):
        """Every live connection's admin view (walks the registry: admin only)."""
        return [session.view() for session in list(self.sessions.values())]

    def abort_all(self):
        """End every live session now (shutdown); returns how many there were."""
        sessions = list(self.sessions.values())
        for session in sessions:
            session.abort()
        return len(sessions)
