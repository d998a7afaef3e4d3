"""A worker's live sessions: a dict keyed by connection id, and the "room again" event.

Insert and remove are O(1) on the data path; the registry is walked only to answer an admin
request or mark a drain, never to find work (the event loop finds work: 389 DS's lesson).  Its
``clients`` count is the worker's descriptor use (two per connection), so the acceptors that
paused at descriptor capacity ask here to be told when a connection ends (gevent's ``rawlink``
pattern: no polling timer).
"""

import itertools


class Registry:
    """The live sessions of one worker process, by connection id."""

    def __init__(self, worker_id=0):
        self.worker_id = worker_id
        self.sessions = {}  # connection id -> Session (its .context is the admin's view)
        self.clients = 0  # clients spawned into a pool and not yet finished (descriptor use)
        self.room_waiters = []  # called once, at the next session's end
        self._ids = itertools.count(1)

    def next_id(self):
        """A new connection id, unique in this worker (and across workers by its prefix)."""
        number = next(self._ids)
        return f"{self.worker_id}-{number}" if self.worker_id else str(number)

    def spawned(self):
        """A client was spawned into a pool (counted before its greenlet first runs, so that a
        burst of accepts cannot overrun the descriptor capacity)."""
        self.clients += 1

    def unspawned(self):
        """A client counted by ``spawned`` whose greenlet could not be started."""
        self.clients -= 1

    def add(self, session):
        """Register a live session (its greenlet is running)."""
        self.sessions[session.context.id] = session

    def remove(self, session):
        """Forget a finished session and tell whoever waited for room."""
        del self.sessions[session.context.id]
        self.clients -= 1
        if self.room_waiters:
            waiters, self.room_waiters = self.room_waiters, []
            for waiter in waiters:
                waiter()

    def notify_when_room(self, callback):
        """Call ``callback()`` once when the next session ends (at most once per callback)."""
        if callback not in self.room_waiters:
            self.room_waiters.append(callback)

    def __len__(self):
        return len(self.sessions)

    def __iter__(self):
        return iter(list(self.sessions.values()))

    def snapshot(self, stacks=False):
        """Every live connection's admin view, with each greenlet's stack if ``stacks``."""
        return [session.view(stacks) for session in self]
