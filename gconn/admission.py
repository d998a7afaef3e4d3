"""Admission decisions for one route in one worker: admit, queue or shed; blocked client hosts.

Pure bookkeeping, no I/O and no waiting: the connection's greenlet (session.py) asks, and waits
itself when told to queue; the acceptor (listener.py) sheds at once what needs no greenlet.
Keycloak's lesson: bound the active sessions, bound the queue, shed the rest with a clear,
counted reason, never an unbounded queue.  MySQL Router's: a client host whose connections keep
failing is blocked.  HAProxy's stick tables and nginx's limit_conn: one client host may hold
so many connections and open them so fast, so that it cannot take everyone's places.
"""

import collections
import heapq

ADMIT, QUEUE = "admit", "queue"  # decisions besides a shed reason
QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"
NO_DESTINATION = "no_destination"
BLOCKED_HOST = "blocked_host"
HOST_LIMIT = "host_limit"  # the client's host holds max-connections-per-host already
HOST_RATE = "host_rate"  # the client's host opened connections faster than its rate
DENIED = "denied"  # allow-from / deny-from
SHED_REASONS = (QUEUE_FULL, QUEUE_TIMEOUT, NO_DESTINATION, BLOCKED_HOST, HOST_LIMIT, HOST_RATE,
                DENIED)
HOST_TABLE = 16384  # client hosts whose connect rate a route remembers per worker


class Admission:
    """A route's active sessions and waiting sessions in one worker.

    ``limit`` is this worker's share of max-connections, ``max_queued`` its share of
    max-queued.  A released slot is handed straight to the longest-waiting session (``release``
    returns it), so nobody arriving later overtakes the queue.  Waiting has no deadline here:
    each waiting greenlet keeps its own queue-timeout and calls ``give_up`` when it runs out.
    """

    def __init__(self, limit, max_queued=0):
        self.limit = limit
        self.max_queued = max_queued
        self.active = 0
        self.waiting = collections.deque()  # waiting sessions, in arrival order
        self.shed = dict.fromkeys(SHED_REASONS, 0)  # clients shed, by reason
        self.admitted = 0  # sessions that got a slot (directly or from the queue)
        self.queued = 0  # sessions that ever waited

    def arrive(self, waiter):
        """A new session: ADMIT (a slot is its), QUEUE (``waiter`` waits in line) or
        QUEUE_FULL (counted)."""
        if self.active < self.limit and not self.waiting:
            self.active += 1
            self.admitted += 1
            return ADMIT
        if len(self.waiting) < self.max_queued:
            self.waiting.append(waiter)
            self.queued += 1
            return QUEUE
        self.shed[QUEUE_FULL] += 1
        return QUEUE_FULL

    def count_shed(self, reason):
        """Count a client shed for ``reason`` outside the queue (blocked host, no destination)."""
        self.shed[reason] += 1

    def release(self):
        """A session gave its slot back: the waiting session it is handed to, or None."""
        if self.waiting:
            self.admitted += 1
            return self.waiting.popleft()
        self.active -= 1
        return None

    def give_up(self, waiter):
        """``waiter``'s queue-timeout ran out: it leaves the line, counted as queue_timeout
        (nothing is counted for a waiter no longer in line: ``drop_waiting`` counted it)."""
        try:
            self.waiting.remove(waiter)  # usually the head: the earliest deadline
        except ValueError:
            return
        self.shed[QUEUE_TIMEOUT] += 1

    def drop_waiting(self):
        """Remove and return every waiting session (the route stops), counted as queue_timeout."""
        waiters = list(self.waiting)
        self.waiting.clear()
        self.shed[QUEUE_TIMEOUT] += len(waiters)
        return waiters


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

    def unblock(self, host):
        """Lift ``host``'s block now (and forget its failures); whether it was blocked."""
        self.failures.pop(host, None)
        return self.blocked_until.pop(host, None) is not None

    def blocked_hosts(self, now):
        """How many hosts are blocked at ``now``."""
        return sum(1 for until in self.blocked_until.values() if until > now)


class HostLimits:
    """Per client host in one worker: its live connections (HAProxy's sc_conn_cur, nginx's
    limit_conn) and a token bucket of new connections per second (sc_conn_rate).

    Bounded in memory whatever the sources: ``live`` holds only hosts with a live connection
    here (a host leaves with its last connection), so it is no larger than the worker's
    connections; ``buckets`` holds at most ``table`` hosts, the least recently seen forgotten
    first.  Forgetting a host gives it a full bucket, which it would have after one quiet
    second anyway; a flood from many sources each keeps to its own rate.  ``max_live`` or
    ``rate`` 0 turns that limit off; live connections are counted either way (for /status).
    """

    def __init__(self, max_live, rate, table=HOST_TABLE):
        self.max_live = max_live
        self.rate = rate
        self.burst = max(1.0, float(rate))  # one second's worth
        self.table = table
        self.live = {}  # host -> its live connections in this worker
        self.buckets = collections.OrderedDict()  # host -> (tokens, when), oldest first

    def admit(self, host, now):
        """A new connection from ``host`` at ``now``: None when it may go on (counted live:
        ``release`` it at its end), else HOST_LIMIT or HOST_RATE (not counted)."""
        live = self.live.get(host, 0)
        if self.max_live and live >= self.max_live:
            return HOST_LIMIT
        if self.rate:
            tokens, when = self.buckets.pop(host, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            refused = tokens < 1.0
            self.buckets[host] = (tokens if refused else tokens - 1.0, now)
            if len(self.buckets) > self.table:
                self.buckets.popitem(last=False)
            if refused:
                return HOST_RATE
        self.live[host] = live + 1
        return None

    def release(self, host):
        """A connection ``admit`` counted has ended."""
        live = self.live.pop(host) - 1
        if live:
            self.live[host] = live

    def top(self, count):
        """The ``count`` hosts with the most live connections: [(host, live)], most first."""
        return heapq.nlargest(count, self.live.items(), key=lambda item: item[1])
