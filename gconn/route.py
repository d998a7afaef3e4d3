"""One route in one worker: the parts that serve it, wired together, and its end-of-session
accounting.

A route has a listening socket and its acceptor (listener.py), a forwarding pool of connection
greenlets (gevent.pool.Pool, sized this worker's share of max-connections + max-queued), its
admission bookkeeping and blocked hosts (admission.py), its destinations (destinations.py:
their health and the addresses discovery found come from the supervisor's checker,
monitor.py).  What happens to one connection is session.py's; this
module holds no per-connection logic beyond counting how sessions ended.
"""

import logging
import os
import time

from gevent.pool import Pool

from . import local, metrics
from .admission import BLOCKED_HOST, DENIED, HOST_LIMIT, Admission, HostBlocker, HostLimits
from .destinations import RouteDestinations
from .listener import Acceptor
from .local import ConnectionContext
from .log import log_access
from .protocols import proxy, refusal, tls
from .protocols.sni import ServerNames
from .session import Session, SessionGreenlet
from .sockets import bound_address, client_host, keepalive_options, listen, peer_name

LOGGER = logging.getLogger("gconn.route")

REFUSALS = 256  # clients of a route refused at once in greenlets of their own (PostgreSQL's)


class Route:
    """One route in this process: listener, pool, admission, destinations, accounting."""

    def __init__(self, config, registry, reuse_port=False, listener=None, shares=None,
                 pool_size=None):
        self.config = config
        self.name = config.name
        self.registry = registry
        self.destinations = RouteDestinations(config.destinations, config.strategy,
                                              config.send_proxy, config.destination_tls,
                                              config.slow_start)
        self.admission = Admission(config.max_connections, config.max_queued)
        self.blocker = HostBlocker(config.max_connect_errors, config.blocked_host_time)
        self.hosts = HostLimits(config.max_connections_per_host,
                                config.max_connect_rate_per_host)
        self.filters_hosts = bool(config.allow_from or config.deny_from)
        # socket options of both sides: keepalive, TCP_USER_TIMEOUT (the client's come from
        # the listener, whose accepted sockets inherit them)
        self.socket_options = keepalive_options(config)
        self.reads_proxy = config.accept_proxy != "no"  # a PROXY header first, then the rest
        self.sni = None  # on a server-names bind: which route serves which name (sni.py)
        self.tls = None  # the SSLContext of a route that terminates TLS (tls.py)
        if config.tls_cert:
            self.tls = tls.server_context(config.tls_cert, config.tls_key, config.tls_client_ca,
                                          config.tls_min_version, config.tls_ciphers)
        self.destination_tls = None  # the SSLContext connections to TLS destinations use
        if any(destination.tls for destination in self.destinations.destinations):
            self.destination_tls = tls.client_context(
                config.destination_tls_ca, config.destination_tls_cert,
                config.destination_tls_key)
        # the acceptor cannot know the client yet (behind a balancer) or its route (by name)
        self.checks_host_later = self.reads_proxy
        # the forwarding pool; a shared bind's first route holds every route's greenlets
        self.pool = Pool(pool_size or config.max_connections + config.max_queued,
                         greenlet_class=SessionGreenlet)
        # greenlets refusing clients shed in the accept path whose refusal needs a reply
        self.refusals = Pool(REFUSALS) if config.protocol in refusal.READS_FIRST else None
        self.accept_pauses = 0  # times accepting paused for descriptors (admin: accept_pauses)
        self.accepted = 0  # clients accepted (metrics.flush publishes the plain counts)
        self.ended = {}  # how sessions ended -> how many
        self.draining = False  # the worker is shutting down: forwarding sessions hold it up
        self.owner = shares or self  # the route whose listener this one is reached through
        if shares is not None:  # picked by server name on another route's listener
            self.owns_address, self.socket, self.server = False, None, None
            self.address = shares.address
            return
        self.owns_address = listener is None  # an inherited unix listener is the supervisor's
        self.socket = listener or listen(config.bind, config.backlog, reuse_port=reuse_port,
                                         options=self.socket_options)
        self.address = bound_address(self.socket, config.bind)
        self.server = Acceptor(self.socket, self)

    def pick_by_server_name(self, routes):
        """Make this route's listener serve ``routes`` (itself among them), each picked by the
        server name of the client's ClientHello; the one without names is the default."""
        named = [(route.config.server_names, route) for route in routes
                 if route.config.server_names]
        default = next((route for route in routes if not route.config.server_names), None)
        self.sni = ServerNames(named, default)
        self.checks_host_later = True

    def serve(self, client, address, host=None):
        """The body of one connection's greenlet (the acceptor spawns it into the pool);
        ``host``: the client host the acceptor counted in ``hosts`` for it."""
        try:
            session = Session(self, client, address)
        except BaseException:  # no session to finish this client: close it here
            self.registry.unspawned()
            if host is not None:
                self.hosts.release(host)
            client.close()
            raise
        session.counted_host = host
        session.run()

    def refused_host(self, host, now):
        """What is decided by the client host alone, before a place is looked for: (reason,
        why) when allow-from / deny-from refuse it (``denied``) or it is blocked
        (``blocked_host``), counted; (None, None) when it may go on.  The acceptor asks when
        it knows the client and route, the connection's greenlet otherwise."""
        if self.filters_hosts and self.denies(host):
            self.admission.count_shed(DENIED)
            return DENIED, f"client host {host} denied by allow-from / deny-from"
        if self.blocker.blocked(host, now):
            self.admission.count_shed(BLOCKED_HOST)
            return BLOCKED_HOST, "client host blocked after max-connect-errors failures"
        return None, None

    def denies(self, host):
        """Whether allow-from / deny-from refuse client ``host`` (a unix-socket peer, which
        the socket file's permissions let in, never)."""
        if host == "unix":
            return False
        config = self.config
        if config.allow_from and not proxy.in_networks(host, config.allow_from):
            return True
        return bool(config.deny_from) and proxy.in_networks(host, config.deny_from)

    def host_limited(self, host, now):
        """Count a new connection from ``host`` (not a unix-socket peer) in ``hosts``: None
        when it may go on, else the shed reason, counted, and why."""
        reason = self.hosts.admit(host, now)
        if reason is None:
            return None, None
        self.admission.count_shed(reason)
        config = self.config
        if reason == HOST_LIMIT:
            return reason, (f"client host {host} holds {config.max_connections_per_host} "
                            f"connections already (max-connections-per-host)")
        return reason, (f"client host {host} opens connections faster than "
                        f"{config.max_connect_rate_per_host}/s (max-connect-rate-per-host)")

    def connect_tls(self, connection, destination):
        """The TLS handshake with ``destination`` on ``connection`` (tls.connect_destination)."""
        return tls.connect_destination(connection, self.destination_tls, self.config,
                                       destination)

    def refusal(self, reason, address):
        """What a client from ``address`` refused for ``reason`` is told, in the route's
        protocol (the shed-message for plain TCP)."""
        config = self.config
        return refusal.message(config.protocol, reason, self.name, client_host(address),
                               self.address, config.shed_message)

    def shed(self, client, address, reason, why):
        """Refuse one client at once in the accept path (already counted): the refusal, the
        close, the access line with ``why`` as its error.  A protocol whose client speaks
        first (PostgreSQL) is refused in a greenlet of its own, from a small bounded pool;
        when that is full the client is closed without a word, as a denied one always is
        (costing no greenlet)."""
        if reason == DENIED:
            pass
        elif self.refusals is not None:
            if not self.refusals.full():
                self.refusals.spawn(self.refuse, client, address, reason, why)
                return
            why += "; closed unanswered: too many refusals under way"
        elif self.tls is None:  # a TLS client expects a handshake: no plaintext refusal
            refusal.refuse(client, self.config.protocol, self.refusal(reason, address))
        client.close()
        context = ConnectionContext(self.registry.next_id(), self.name, peer_name(address))
        log_access(context, reason, 0.0, why)

    def refuse(self, client, address, reason, why):
        """The greenlet of one client shed in the accept path whose refusal needs a reply:
        read, answer, close, log (bounded by refusal.STARTUP_TIMEOUT)."""
        started = time.monotonic()
        context = ConnectionContext(self.registry.next_id(), self.name, peer_name(address))
        context.phase = "refusing"
        local.set_current(context)
        try:
            refusal.refuse(client, self.config.protocol, self.refusal(reason, address))
        finally:
            client.close()
            log_access(context, reason, time.monotonic() - started, why)

    def session_ended(self, session, end, duration):
        """A session finished: count how, and count it for or against its client's host."""
        now = time.monotonic()
        host = client_host(session.address)
        if end == "connect_failed" or (
                end == "client_closed" and session.context.bytes_up == 0
                and session.destination is not None
                and duration < self.config.client_connect_timeout):
            if self.blocker.failed(host, now):
                LOGGER.warning("route=%s client host %s blocked for %.0fs after %d failed "
                               "connections", self.name, host,
                               self.config.blocked_host_time, self.config.max_connect_errors)
        elif session.context.bytes_up:
            self.blocker.succeeded(host)
        if session.counted_host is not None:
            self.hosts.release(session.counted_host)
        self.ended[end] = self.ended.get(end, 0) + 1
        metrics.observe("session_seconds", self.name, duration)

    def start(self):
        """Start accepting."""
        if self.server is not None:
            self.server.start()
        shared = "" if self.owner is self else f" (by server name, on route {self.owner.name}'s" \
                                                f" listener)"
        LOGGER.info("listening route=%s address=%s%s", self.name, self.address, shared)

    def stop_accepting(self):
        """Close the listener: new clients are refused, live sessions go on; waiting sessions
        are shed (they would wait for a slot that a draining worker will not give)."""
        if self.server is not None:
            self.server.close()
        for waiter in self.admission.drop_waiting():  # counted there; each wakes and leaves
            waiter.woken.set()
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

