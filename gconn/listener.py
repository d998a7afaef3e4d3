"""A route's acceptor: a gevent StreamServer on the route's listening socket whose accept
callback carries out the route's admission decisions (admission.py).

The accept callback runs in the hub (no greenlet per accept) and never waits: a client is
admitted (its session spawns a greenlet to connect), queued (bounded, in arrival order, one
timer per route for the queue-timeout), or shed at once with the shed-message and a counted
reason (blocked_host, no_destination, queue_full, queue_timeout), so a full or flooded route
never stalls the others.
Accept errors are sorted by class (gevent ``BaseServer._do_read``, trio
``_serve_one_listener``): EBADF/EINVAL/ENOTSOCK close the listener (gevent does that);
EMFILE/ENFILE/ENOBUFS/ENOMEM mean the process is out of a resource, so accepting pauses with
exponential backoff, logged once per episode and counted, and live connections are untouched.
The worker does not wait for EMFILE: once its live connections fill its descriptor capacity
(two per connection), accepting pauses the same way and clients wait in the listen backlog
rather than being accepted only to find no descriptor left for their destination.
The listening socket is made by sockets.listen (or inherited) and closed here.
"""

import _socket
import logging
import os
import socket
import time

from gevent.hub import get_hub
from gevent.server import StreamServer

from . import metrics
from .admission import (
    ADMIT,
    BLOCKED_HOST,
    NO_DESTINATION,
    QUEUE,
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    Admission,
    HostBlocker,
)
from .destinations import RouteDestinations
from .health import HealthChecks
from .local import ConnectionContext
from .log import log_access
from .session import Session
from .sockets import (
    RESOURCE_ERRORS,
    bound_address,
    client_host,
    descriptor_capacity,
    listen,
    peer_name,
)

LOGGER = logging.getLogger("gconn.listener")

ACCEPT_BATCH = 16  # clients taken per readiness event: a flood cannot hog the loop (gevent: 100)
BACKOFF_MIN = 0.01  # seconds of the first pause after running out of descriptors
BACKOFF_MAX = 0.25  # the longest pause between accept attempts while still out


class Acceptor(StreamServer):
    """StreamServer that pauses, instead of spinning or tracing, when out of descriptors."""

    def __init__(self, listener, handle, route):
        super().__init__(listener, handle, spawn=None)  # handle runs in the hub: no greenlet
        self.max_accept = ACCEPT_BATCH
        self.route = route
        self.raw_listener = getattr(listener, "_sock", listener)  # the OS socket under gevent's
        self.backoff = 0.0  # current pause; 0 while accepting normally
        self.pause_timer = None

    def do_read(self):
        """Accept one client as a plain non-blocking OS socket (gevent's wrapper and its
        watchers would cost more than forwarding a short connection; the pump makes its own);
        on resource exhaustion pause accepting and return nothing."""
        route = self.route
        if len(route.registry) + len(route.admission.waiting) >= route.descriptor_capacity:
            self.pause("descriptor capacity reached")
            return None
        try:
            fd, address = self.raw_listener._accept()
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno not in RESOURCE_ERRORS:
                raise
            self.pause(error.strerror)
            return None
        client = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        client.setblocking(False)
        if self.backoff:
            LOGGER.warning("route=%s accepting again after running out of descriptors",
                           self.route.name)
            self.backoff = 0.0
        return client, address

    def do_handle(self, client, address):
        """The handler owns the client from here (it runs in the hub: no greenlet)."""
        self._handle(client, address)

    def pause(self, reason):
        """Stop accepting for the current backoff, doubling it up to BACKOFF_MAX."""
        self.route.accept_exhausted += 1
        if not self.backoff:
            LOGGER.warning("route=%s out of descriptors (%s): pausing accepts, live "
                           "connections continue", self.route.name, reason)
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self.backoff * 2))
        self.stop_accepting()
        if self.pause_timer is not None:
            self.pause_timer.close()
        self.pause_timer = self.loop.timer(self.backoff)
        self.pause_timer.start(self._start_accepting_if_started)

    def close(self):
        if self.pause_timer is not None:
            self.pause_timer.close()
            self.pause_timer = None
        super().close()


def client_gone(client):
    """Whether a waiting client has already closed (or reset) its connection."""
    try:
        return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class RouteServer:
    """One route in one process: listener, admission (queue, shedding, blocked hosts),
    destinations with their health checks, and the worker's registry."""

    def __init__(self, config, registry, reuse_port=False, listener=None):
        self.config = config
        self.descriptor_capacity = descriptor_capacity()
        self.name = config.name
        self.registry = registry
        self.destinations = RouteDestinations(config.destinations, config.strategy)
        self.health = HealthChecks(self)
        self.accept_exhausted = 0  # accept attempts that found the process out of descriptors
        self.accepted = 0  # clients accepted (metrics.flush publishes the plain counts)
        self.ended = {}  # how sessions ended -> how many
        self.owns_address = listener is None  # an inherited unix listener is the supervisor's
        self.socket = listener or listen(config.bind, config.backlog, reuse_port=reuse_port)
        self.address = bound_address(self.socket, config.bind)
        self.server = Acceptor(self.socket, self.handle, self)
        self.admission = Admission(config.max_connections, config.max_queued,
                                   config.queue_timeout)
        self.blocker = HostBlocker(config.max_connect_errors, config.blocked_host_time)
        self.queue_timer = None
        self.loop = get_hub().loop

    def handle(self, client, address):
        """StreamServer's handler, in the hub: admit, queue or shed one accepted client."""
        try:
            now = time.monotonic()
            self.accepted += 1
            host = client_host(address)
            if self.blocker.blocked(host, now):
                return self.shed(client, address, BLOCKED_HOST)
            # one strategy pass per client: a queued client takes a second when served, so
            # its turn is counted twice (round-robin skips one place: harmless)
            candidates = self.destinations.candidates(now)
            if not candidates:
                return self.shed(client, address, NO_DESTINATION)
            decision = self.admission.arrive((client, address), now)
            if decision == ADMIT:
                Session(self, client, address, host).start(candidates)
            elif decision == QUEUE:
                self.arm_queue_timer()
            else:
                self.shed(client, address, decision)
        except BaseException:
            client.close()
            raise

    def shed(self, client, address, reason):
        """Refuse one client at once: the shed-message, the close, the count, the log line."""
        if reason not in (QUEUE_FULL, QUEUE_TIMEOUT):  # those the admission counted itself
            self.admission.count_shed(reason)
        message = self.config.shed_message
        if message:
            try:
                client.send(message)  # best effort, never waits: the client is leaving
            except OSError:
                pass
        client.close()
        self.log_unserved(address, reason)

    def log_unserved(self, address, end):
        """The access-log line of a client closed without a session."""
        context = ConnectionContext(self.registry.next_id(), self.name, peer_name(address))
        context.phase = "closed"
        log_access(context, end, 0.0)

    def arm_queue_timer(self):
        """One timer per route, due when the longest-waiting client's wait runs out."""
        if self.queue_timer is None:
            deadline = self.admission.next_deadline()
            if deadline is not None:
                self.queue_timer = self.loop.timer(max(0.0, deadline - time.monotonic()))
                self.queue_timer.start(self.on_queue_timer)

    def on_queue_timer(self):
        """Shed the waiting clients whose queue-timeout has passed; re-arm for the next."""
        self.queue_timer.close()
        self.queue_timer = None
        self.service_queue(time.monotonic())

    def service_queue(self, now):
        """Shed the waiting clients that are late, start sessions for the next ones while
        there is room (a client that already hung up is closed, not connected onwards)."""
        for client, address in self.admission.expired(now):
            self.shed(client, address, QUEUE_TIMEOUT)
        while (waiting := self.admission.take(now)) is not None:
            client, address = waiting
            if client_gone(client):
                self.admission.release()
                client.close()
                self.log_unserved(address, "client_closed")
                continue
            Session(self, client, address, client_host(address)).start(
                self.destinations.candidates(now))
        self.arm_queue_timer()

    def session_ended(self, session, end, duration):
        """A session finished: count it for its host, hand its slot to the next waiting."""
        now = time.monotonic()
        if end == "connect_failed" or (
                end == "client_closed" and session.context.bytes_up == 0
                and duration < self.config.client_connect_timeout):
            if self.blocker.failed(session.host, now):
                LOGGER.warning("route=%s client host %s blocked for %.0fs after %d failed "
                               "connections", self.name, session.host,
                               self.config.blocked_host_time, self.config.max_connect_errors)
        elif session.context.bytes_up:
            self.blocker.succeeded(session.host)
        self.admission.release()
        if end.startswith("error"):
            end = "error"  # the text is the access log's; a metric label must stay bounded
        self.ended[end] = self.ended.get(end, 0) + 1
        metrics.observe("session_seconds", self.name, duration)
        if self.admission.waiting:
            self.service_queue(now)

    def start(self):
        """Start accepting and checking destinations."""
        self.server.start()
        self.health.start()
        LOGGER.info("listening route=%s address=%s", self.name, self.address)

    def stop_accepting(self):
        """Close the listener: new clients are refused, live sessions go on; waiting clients
        are shed (they would wait for a slot that a draining worker will not give)."""
        self.server.close()
        self.health.stop()
        if self.queue_timer is not None:
            self.queue_timer.close()
            self.queue_timer = None
        for client, address in self.admission.drop_waiting():  # counted there
            self.shed(client, address, QUEUE_TIMEOUT)
        if self.config.bind.family == "unix" and self.owns_address:
            try:
                os.unlink(self.config.bind.path)
            except OSError:
                pass

    def summary(self):
        """One line of this route's admission counters (logged when the worker stops)."""
        counts = " ".join(f"shed_{reason}={count}"
                          for reason, count in self.admission.shed.items())
        return (f"route={self.name} admitted={self.admission.admitted} "
                f"queued={self.admission.queued} {counts}")
