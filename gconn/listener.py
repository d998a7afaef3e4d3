"""A route's acceptor: a gevent StreamServer that spawns one greenlet per client into the
route's forwarding pool, or sheds the client at once.

The accept path runs in the hub and never waits: a client allow-from / deny-from refuse is
closed (``denied``); a client from a blocked host is shed (``blocked_host``), and so is every
client while the pool is full (``queue_full``: the pool is sized max-connections +
max-queued, so a full pool means a full queue) and one whose host is over its per-host
limits (``host_limit``, ``host_rate``), with the shed-message and an access line.  Anything
else is spawned into the pool, where its greenlet (session.py) does all the rest.
Accept errors are sorted by class (gevent ``BaseServer._do_read``, trio
``_serve_one_listener``): EBADF/EINVAL/ENOTSOCK close the listener (gevent does that);
EMFILE/ENFILE/ENOBUFS/ENOMEM mean the process is out of a resource.  The worker does not wait
for EMFILE: once its live connections fill its descriptor capacity (two per connection),
accepting pauses and clients wait in the listen backlog; it resumes when a connection ends (the
registry's room event), never on a polling timer.  An accept the OS refuses for lack of a
resource also re-arms an exponential backoff (the shortage may not be the sessions' doing, or
may pass by itself), whichever comes first.  Each episode is logged once.
The listening socket is made by sockets.listen (or inherited) and closed here.
"""

import _socket
import logging
import socket
import time

from gevent.server import StreamServer

from .admission import QUEUE_FULL
from .sockets import RESOURCE_ERRORS, client_host, descriptor_capacity

LOGGER = logging.getLogger("gconn.listener")

ACCEPT_BATCH = 16  # clients taken per readiness event: a flood cannot hog the loop (gevent: 100)
BACKOFF_MIN = 0.01  # seconds of the first pause after the OS refused an accept (EMFILE, ...)
BACKOFF_MAX = 0.25  # the longest such pause


class Acceptor(StreamServer):
    """The route's StreamServer: spawns ``route.serve`` into ``route.pool`` or sheds."""

    def __init__(self, listener, route):
        super().__init__(listener, route.serve, spawn=route.pool)
        # A full pool sheds here (queue_full) instead of pausing accepts as gevent's default
        # ``full`` does; accepting pauses only for descriptors, resumed by the registry.
        self.full = lambda: False
        self.pool._semaphore.unlink(self._start_accepting_if_started)  # as gevent's close does
        self.max_accept = ACCEPT_BATCH
        self.route = route
        self.registry = route.registry
        self.capacity = descriptor_capacity()  # connections this worker has descriptors for
        self.raw_listener = getattr(listener, "_sock", listener)  # the OS socket under gevent's
        self.backoff = 0.0  # current backoff after a refused accept; 0 while accepting normally
        self.paused = False  # in a pause episode (logged once): out of descriptors
        self.pause_timer = None

    def do_read(self):
        """Accept one client as a plain non-blocking OS socket (gevent's wrapper and its
        watchers would cost more than forwarding a short connection; the pump makes its own);
        at descriptor capacity or on resource exhaustion pause accepting and return nothing."""
        if self.registry.clients >= self.capacity:
            self.pause("descriptor capacity reached", backoff=False)
            return None
        try:
            fd, address = self.raw_listener._accept()
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno not in RESOURCE_ERRORS:
                raise
            self.pause(error.strerror, backoff=True)
            return None
        client = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        client.setblocking(False)
        if self.paused and self.registry.clients + 1 < self.capacity:  # room for more again
            LOGGER.warning("route=%s accepting again", self.route.name)
            self.paused = False
            self.backoff = 0.0
        return client, address

    def do_handle(self, client, address):
        """Spawn the client's greenlet into the pool, or shed it at once (never waits)."""
        route = self.route
        route.accepted += 1
        # behind a balancer (accept-proxy) the peer is the balancer, and on a bind shared by
        # server name the route is not known yet: the connection's greenlet checks the
        # client host (the one its PROXY header names) instead
        host = None if route.checks_host_later else client_host(address)
        now = time.monotonic()
        if host is not None:
            reason, why = route.refused_host(host, now)
            if reason is not None:
                return route.shed(client, address, reason, why)
        if self.pool.full():
            route.admission.count_shed(QUEUE_FULL)
            return route.shed(client, address, QUEUE_FULL,
                              f"all {self.pool.size} places (active and queued) taken")
        if host == "unix":  # a unix-socket peer has no host to count
            host = None
        if host is not None:
            reason, why = route.host_limited(host, now)
            if reason is not None:
                return route.shed(client, address, reason, why)
        self.registry.spawned()
        try:
            self._spawn(route.serve, client, address, host)
        except BaseException:  # the greenlet will never finish this client: nobody else closes
            self.registry.unspawned()
            if host is not None:
                route.hosts.release(host)
            client.close()
            raise

    def pause(self, reason, backoff):
        """Stop accepting until a connection ends; with ``backoff`` (the OS refused an accept:
        the shortage may not be the sessions' doing, or pass by itself) at most for the
        current backoff too."""
        self.route.accept_pauses += 1
        self.stop_accepting()
        if not self.paused:
            LOGGER.warning("route=%s out of descriptors (%s): pausing accepts until a "
                           "connection ends; live connections continue", self.route.name, reason)
            self.paused = True
        if self.registry.clients:
            self.registry.notify_when_room(self.resume)
        if not backoff:
            return
        if self.pause_timer is not None:
            self.pause_timer.close()
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self.backoff * 2))
        self.pause_timer = self.loop.timer(self.backoff)
        self.pause_timer.start(self.resume)

    def resume(self):
        """Room again (or the backoff passed): accept, unless the acceptor was closed."""
        if self.pause_timer is not None:
            self.pause_timer.close()
            self.pause_timer = None
        self._start_accepting_if_started()

    def close(self):
        if self.pause_timer is not None:
            self.pause_timer.close()
            self.pause_timer = None
        super().close()
