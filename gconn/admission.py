"""Admission decisions for one route in one worker: admit, queue or shed; blocked client hosts.

Pure bookkeeping, no I/O, times passed in (monotonic seconds), so every decision is tested
without sockets; listener.py carries the decisions out.  Keycloak's lesson: bound the active
sessions, bound the queue, shed the rest at once with a clear, counted reason, never an
unbounded queue.  MySQL Router's: a client host whose connections keep failing is blocked.
"""

import collections

ADMIT, QUEUE = "admit", "queue"  # decisions besides a shed reason
QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"
NO_DESTINATION = "no_destination"
BLOCKED_HOST = "blocked_host"
FD_EXHAUSTED = "fd_exhausted"
SHED_REASONS = (QUEUE_FULL, QUEUE_TIMEOUT, NO_DESTINATION, BLOCKED_HOST, FD_EXHAUSTED)


class Admission:
    """A route's active sessions and waiting clients in one worker.

    ``limit`` is this worker's share of max-connections, ``max_queued`` its share of
    max-queued.  Waiting clients leave in arrival order; each has a deadline of
    ``queue_timeout`` after its arrival, so the head always expires first.
    """

    def __init__(self, limit, max_queued=0, queue_timeout=0.0):
        self.limit = limit
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.active = 0
        self.waiting = collections.deque()  # (deadline, item) in arrival order
        self.shed = dict.fromkeys(SHED_REASONS, 0)  # clients shed, by reason
        self.admitted = 0  # sessions started (directly or from the queue)
        self.queued = 0  # clients that ever waited

    def full(self):
        """Whether a new session would exceed the limit."""
        return self.active >= self.limit

    def arrive(self, item, now):
        """A new client: ADMIT (counted active), QUEUE (kept with its deadline) or QUEUE_FULL."""
        if not self.full() and not self.waiting:
            self.active += 1
            self.admitted += 1
            return ADMIT
        if len(self.waiting) < self.max_queued:
            self.waiting.append((now + self.queue_timeout, item))
            self.queued += 1
            return QUEUE
        self.shed[QUEUE_FULL] += 1
        return QUEUE_FULL

    def count_shed(self, reason):
        """Count a client shed for ``reason`` before it reached the queue."""
        self.shed[reason] += 1

    def expired(self, now):
        """Remove and return the waiting clients whose deadline has passed (counted)."""
        gone = []
        while self.waiting and self.waiting[0][0] <= now:
            gone.append(self.waiting.popleft()[1])
        self.shed[QUEUE_TIMEOUT] += len(gone)
        return gone

    def next_deadline(self):
        """The deadline of the longest-waiting client, or None."""
        return self.waiting[0][0] if self.waiting else None

    def release(self):
        """A session ended: one slot fewer in use (``take`` hands it to a waiting client)."""
        self.active -= 1

    def take(self, now):
        """The longest-waiting client still within its deadline, if there is room: counted
        active and returned; else None.  Call ``expired`` first to shed the late ones."""
        if self.waiting and not self.full() and self.waiting[0][0] > now:
            self.active += 1
            self.admitted += 1
            return self.waiting.popleft()[1]
        return None

    def drop_waiting(self):
        """Remove and return every waiting client (shutdown), counted as queue_timeout."""
        items = [item for _, item in self.waiting]
        self.waiting.clear()
        self.shed[QUEUE_TIMEOUT] += len(items)
        return items


class HostBlocker:
    """MySQL Router's max_connect_errors: consecutive failures per client host block it.

    A failure is a session whose destinations all failed for it, or a client that closed
    within client-connect-timeout without sending a byte; a session that forwarded a byte from
    the client resets the count.  At ``max_errors`` the host's new connections are refused
    until ``block_time`` has passed.  ``max_errors`` 0 turns blocking off.
    """

    def __init__(self, max_errors, block_time):
        self.max_errors = max_errors
        self.block_time = block_time
        self.failures = {}  # host -> consecutive failures
        self.blocked_until = {}  # host -> monotonic time its block ends

    def blocked(self, host, now):
        """Whether ``host`` is blocked at ``now`` (an ended block is forgotten)."""
        until = self.blocked_until.get(host)
        if until is None:
            return False
        if now < until:
            return True
        del self.blocked_until[host]
        return False

    def failed(self, host, now):
        """Count a failure; returns True when this one blocks the host."""
        if not self.max_errors:
            return False
        count = self.failures.get(host, 0) + 1
        if count >= self.max_errors:
            self.failures.pop(host, None)
            self.blocked_until[host] = now + self.block_time
            return True
        self.failures[host] = count
        return False

    def succeeded(self, host):
        """A good session from ``host``: its failure count starts again."""
        self.failures.pop(host, None)

    def blocked_hosts(self, now):
        """How many hosts are blocked at ``now``."""
        return sum(1 for until in self.blocked_until.values() if until > now)
