"""One client connection's life, in one greenlet from accept to its access-log line.

The route's acceptor spawns ``Session.run`` into the route's forwarding pool; everything done
for the connection happens here, top to bottom: wait for an active slot (queued, in arrival
order, up to queue-timeout), pick destinations, connect with failover, forward both directions
(forward.py: this greenlet waits on both sockets itself), and finish: close both sockets
exactly once, give the slot back, write the access-log line. Errors are exceptions caught in
one place, ``run``. Behind a balancer (accept-proxy) the first step reads its PROXY header
(protocols/proxy.py); on a bind shared by server name the next reads the ClientHello and
makes the session the chosen route's (protocols/sni.py), forwarding the hello first; a
refused client is told why in its route's protocol (protocols/refusal.py). The connection's
context and error state live on this greenlet (local.py), so every log line written here
carries ``conn=`` and the access line carries ``error=`` when the connection ended
abnormally. The client's bytes are never read before a destination is connected (they wait
in the kernel), except a PROXY header, a ClientHello (kept and forwarded first) and what a
refused PostgreSQL client says before it listens. The session owns and closes both sockets;
killing its greenlet (GreenletExit, the pool's kill at shutdown) ends it cleanly as
``shutdown``.
"""

import logging
import random
import socket
import time

from gevent import Greenlet, GreenletExit
from gevent.event import Event
from greenlet import getcurrent

from . import local, metrics
from .admission import ADMIT, DENIED, NO_DESTINATION, QUEUE, QUEUE_TIMEOUT
from .errors import DestinationUnavailable, ResourceExhausted, Shed
from .forward import Pump
from .log import log_access
from .protocols import proxy, refusal, sni, tls
from .runtime import Maintenance
from .sockets import client_host, connect, peer_name, send_within

LOGGER = logging.getLogger("gconn.session")


def connect_destination(route, candidates, prepare):
    """Try ``candidates`` in order; return (socket, end, destination) of the first that
    connects and that ``prepare(socket, destination)`` readies (a PROXY header, a TLS
    handshake), ``end`` being what it returns: where to forward.

    The socket is owned by the caller.  Each failure is logged, recorded on the destination
    (quarantined while health checks run) and in this greenlet's error state.  Raises
    DestinationUnavailable when every candidate failed, ResourceExhausted when this process is
    out of descriptors."""
    failures = []
    for destination in candidates:
        begun = time.monotonic()
        try:
            connection = connect(destination.address, route.config.connect_timeout,
                                 route.config.source, route.socket_options)
        except DestinationUnavailable as error:
            destination_failed(route, destination, error, failures)
            continue
        try:
            end = prepare(connection, destination)
        except DestinationUnavailable as error:
            connection.close()
            destination_failed(route, destination, error, failures)
            continue
        except BaseException:
            connection.close()
            raise
        if failures:  # a failover that succeeded is not how this connection ends
            local.clear_error()
        destination.connect_succeeded()
        metrics.observe("connect_seconds", route.name, time.monotonic() - begun)
        return connection, end, destination
    raise DestinationUnavailable(f"route {route.name}: every destination failed")


def destination_failed(route, destination, error, failures):
    """Record one destination's failure: quarantine, retry-interval, the error state."""
    if route.config.check_interval > 0:  # quarantined until the checks see it rise
        route.destinations.quarantine(destination, str(error), route.config.rise)
        LOGGER.warning("route=%s destination %s is down (quarantined)", route.name,
                       destination.address)
    destination.connect_failed(time.monotonic(), route.config.retry_interval, str(error))
    failures.append(str(error))
    local.set_error("connect_failed", "; ".join(failures))
    LOGGER.warning("destination %s failed: %s", destination.address, error)


def connection_lifetime(lifetime, jitter, draw=random.uniform):
    """This connection's lifetime in seconds: ``lifetime`` plus an extra drawn in [0,
    ``jitter``] (max-connection-lifetime and its jitter), so that connections opened together
    are not all closed together; None when ``lifetime`` is 0 (off)."""
    if lifetime <= 0:
        return None
    return lifetime + (draw(0.0, jitter) if jitter > 0 else 0.0)


def client_gone(client):
    """Whether a client has already closed (or reset) its connection, without reading it."""
    try:
        return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class SessionGreenlet(Greenlet):
    """The greenlet of one connection: what the route's forwarding pool spawns (route.py).

    gevent keeps, for every greenlet, the stack it was spawned from (``spawning_stack``, up to
    ten frames, only for debugging).  Every session is spawned from the same place, its
    route's acceptor in the hub, so that record tells nothing, yet it held 4 of the 11
    allocations made per greenlet, about 240 bytes per live connection (tracemalloc in a
    worker holding idle connections).  ``spawning_greenlet``, which local.current() walks so
    a child greenlet answers with its session's context, is kept."""

    spawning_stack_limit = 0


class Session:
    """One accepted client of one route; ``run`` is its greenlet's whole life."""

    __slots__ = ("route", "client", "address", "context", "started", "greenlet", "upstream",
                 "destination", "pump", "has_slot", "woken", "addressed", "hello",
                 "tls_end", "counted_host")

    def __init__(self, route, client, address):
        self.route = route
        self.client = client
        self.address = address
        self.context = local.ConnectionContext(route.registry.next_id(), route.name,
                                               peer_name(address))
        self.started = time.monotonic()
        self.greenlet = None  # the greenlet running ``run``
        self.upstream = None  # the destination socket, once connected
        self.destination = None
        self.pump = None
        self.has_slot = False  # holds one of the route's active slots (give it back at finish)
        self.woken = None  # the Event a queued session waits on
        self.addressed = None  # where the client connected to, as a received PROXY header said
        self.hello = b""  # the ClientHello bytes read to pick the route: forwarded first
        self.tls_end = None  # the client's side through terminated TLS (protocols/tls.py)
        self.counted_host = None  # the client host counted live in the route's HostLimits

    def run(self):
        """The connection's greenlet: slot, destination, forward, finish; never raises."""
        self.greenlet = getcurrent()
        local.set_current(self.context)
        self.route.registry.add(self)
        end = "error"
        try:
            end = self.serve()
        except Shed as shed:
            end = self.refuse(shed.reason, str(shed))
        except proxy.ProxyHeaderError as error:  # a balancer's mistake or a spoofer: just close
            local.set_error("bad_proxy_header", str(error))
            end = "bad_proxy_header"
        except (sni.HelloError, tls.TlsError) as error:  # no whole ClientHello, or handshake
            local.set_error("tls_handshake_failed", str(error))
            end = "tls_handshake_failed"
        except sni.UnknownServerName as error:
            local.set_error("unknown_server_name", str(error))
            end = "unknown_server_name"
        except DestinationUnavailable as error:  # each failure is in the error state already
            LOGGER.warning("%s", error)
            end = "connect_failed"
            if self.route.config.protocol != "tcp":  # a database client is told (2003, ...)
                self.tell(end)
        except ResourceExhausted as error:
            local.set_error("fd_exhausted", str(error))
            LOGGER.warning("%s", error)
            end = "fd_exhausted"
        except Maintenance as ending:  # maint, or checks took the destination down
            end = ending.END
            local.set_error(end, f"destination {self.context.destination} "
                                 + ("put in maintenance" if end == "maint" else
                                    "taken down by health checks"))
        except GreenletExit:
            local.set_error("shutdown", f"cut in phase {self.context.phase} by shutdown")
            end = "shutdown"
        except Exception as error:  # a bug or an unforeseen OS error: this connection only
            local.set_error("error", f"{type(error).__name__}: {error}")
            LOGGER.exception("session failed")
        finally:
            self.finish(end)

    def serve(self):
        """Wait for a slot, connect a destination, forward; return how the connection ended."""
        route = self.route
        if self.client.family != socket.AF_UNIX:
            # Nagle on our sends to the client plus its delayed ACK costs ~40 ms per reply
            self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if route.reads_proxy:
            self.context.phase = "handshake"
            self.read_proxy_header()
        if route.sni is not None:
            route = self.pick_route_by_server_name()
        if route.owner.checks_host_later:  # the acceptor left it to this greenlet
            self.check_host(route)
        if route.tls is not None:
            self.terminate_tls()
        decision = route.admission.arrive(self)  # counts a queue_full shed itself
        if decision == ADMIT:
            self.has_slot = True
        elif decision == QUEUE:
            self.wait_for_slot()
            if client_gone(self.client):  # it gave up while waiting: do not connect onwards
                return "client_closed"
        else:  # its queue is full too: a route sharing a bind by name shares that bind's
            raise Shed(decision, "queue full")  # pool, so its own places may all be taken
        upstream_end = self.connect(route)
        if self.hello:  # the ClientHello that picked the route, untouched, before the rest
            self.send_first(self.hello)
        self.context.phase = "draining" if route.draining else "forwarding"
        LOGGER.debug("forwarding client=%s destination=%s", self.context.client,
                     self.context.destination)  # conn= comes from this greenlet's context
        config = route.config
        if self.tls_end is None and upstream_end is self.upstream:
            self.pump = Pump(self.client, self.upstream, config.buffer_size, config.splice)
        else:  # plaintext comes out of a TLS session, not the socket: nothing to splice
            self.pump = Pump(self.tls_end or self.client, upstream_end, config.buffer_size,
                             splice=False)
        lifetime = connection_lifetime(config.max_connection_lifetime,
                                       config.max_connection_lifetime_jitter)
        if lifetime is not None:  # counted from the accept: left of it once forwarding starts
            lifetime = max(0.0, self.started + lifetime - time.monotonic())
        return self.pump.run(config.idle_timeout, config.client_fin_timeout,
                             config.server_fin_timeout, lifetime)

    def connect(self, route):
        """Connect the first of the route's candidates for this client that takes it (with
        failover); return the end to forward to.  The candidate list goes with this frame,
        not kept for the connection's whole life."""
        self.context.phase = "connecting"
        candidates = route.destinations.candidates(time.monotonic(), client_host(self.address))
        if not candidates:
            route.admission.count_shed(NO_DESTINATION)
            raise Shed(NO_DESTINATION, f"route {route.name}: no destination available")
        self.upstream, upstream_end, self.destination = connect_destination(
            route, candidates, self.prepare_upstream)
        self.context.destination = self.destination.name
        return upstream_end

    def check_host(self, route):
        """What the acceptor checks when it knows the client host and route: allow-from /
        deny-from, a blocked host, the per-host limits (the host is then counted live)."""
        host = client_host(self.address)
        now = time.monotonic()
        reason, why = route.refused_host(host, now)
        if reason is not None:
            raise Shed(reason, why)
        if host != "unix":
            reason, why = route.host_limited(host, now)
            if reason is not None:
                raise Shed(reason, why)
            self.counted_host = host

    def read_proxy_header(self):
        """The route's first step behind a balancer: believe a PROXY header only from
        accept-proxy-from (or a unix-socket peer), read it (proxy-header-timeout), and make
        the client it names this connection's client everywhere (access log, blocked hosts,
        admin), the balancer's address going to ``via``.  A v2 LOCAL header (the balancer's
        own health check) keeps the balancer as the client.  ProxyHeaderError ends the
        connection."""
        config = self.route.config
        balancer = client_host(self.address)
        # a unix-socket peer is a process on this host, let in by the socket file's permissions
        if self.client.family != socket.AF_UNIX and not proxy.in_networks(
                balancer, config.accept_proxy_from):
            raise proxy.ProxyHeaderError(f"PROXY header not believed from {balancer} "
                                         f"(not in accept-proxy-from)")
        info = proxy.read_header(self.client, config.accept_proxy, config.proxy_header_timeout)
        if info.command != "PROXY" or info.source is None:
            return
        self.context.via = self.context.client
        self.address, self.addressed = info.source, info.destination
        self.context.client = peer_name(info.source)

    def terminate_tls(self):
        """The TLS handshake with the client, within tls-handshake-timeout; its version,
        cipher and server name go to the access line.  TlsError ends the connection."""
        self.context.phase = "handshake"
        route = self.route
        self.tls_end = tls.handshake(self.client, route.tls, route.config.tls_handshake_timeout)
        session = self.tls_end.tls
        self.context.tls = (session.version(), session.cipher()[0])
        self.context.sni = getattr(session, "sni", None)

    def pick_route_by_server_name(self):
        """On a bind shared by server name: read the client's ClientHello (bounded in bytes
        and tls-handshake-timeout, decided as soon as it is whole), become a session of the
        route serving that name, and keep the bytes to forward first.  HelloError or
        UnknownServerName end the connection."""
        owner = self.route
        self.context.phase = "handshake"
        hello, self.hello = sni.read_client_hello(self.client, owner.config.tls_handshake_timeout)
        self.context.sni = hello.server_name
        route = owner.sni.route_for(hello.server_name)
        if route is None:
            raise sni.UnknownServerName(f"no route of {owner.address} serves server name "
                                        f"{hello.server_name or '(none)'}")
        if route is not owner:  # counted where it was accepted; it belongs to the other route
            owner.accepted -= 1
            route.accepted += 1
            self.route = route
            self.context.route = route.name
        return route

    def prepare_upstream(self, connection, destination):
        """Ready a fresh destination connection: its PROXY header, then its TLS handshake
        (within connect-timeout); return the end to forward to.  DestinationUnavailable
        makes connect_destination try the next destination."""
        if destination.send_proxy != "no":
            try:
                self.send_proxy_header(connection, destination.send_proxy)
            except DestinationUnavailable as error:
                raise DestinationUnavailable(f"{destination.name}: {error}") from None
        if not destination.tls:
            return connection
        return self.route.connect_tls(connection, destination)

    def send_proxy_header(self, connection, version):
        """Tell the destination who the client is, before its first byte: the client's
        address (the one a received header named) and the address it connected to.  A
        received header's v2 TLVs are not passed on: they describe the balancer's side."""
        config = self.route.config
        source = self.address if isinstance(self.address, tuple) else None  # unix: UNKNOWN
        addressed = self.addressed
        if source is not None and not isinstance(addressed, tuple):
            addressed = self.client.getsockname()[:2]
        build = proxy.build_v2 if version == "v2" else proxy.build_v1
        header = build(source, addressed if source is not None else None)
        proxy.send_header(connection, header, config.connect_timeout)

    def send_first(self, data):
        """Write ``data`` to the destination before any client byte, within connect-timeout;
        DestinationUnavailable (recorded as connect_failed) when it does not take it."""
        try:
            sent = send_within(self.upstream, data, time.monotonic()
                               + self.route.config.connect_timeout)
            why = None if sent else "did not take the ClientHello within connect-timeout"
        except OSError as error:
            why = f"sending the ClientHello: {error.strerror or error}"
        if why:
            local.set_error("connect_failed", f"{self.destination.name}: {why}")
            raise DestinationUnavailable(f"{self.destination.name}: {why}")

    def wait_for_slot(self):
        """Queued: wait for a slot handed over by ``give_slot``, up to queue-timeout;
        Shed(queue_timeout) when it ran out or the route stopped first."""
        self.context.phase = "queued"
        self.woken = Event()
        timeout = self.route.config.queue_timeout
        try:
            self.woken.wait(timeout)
        finally:
            if not self.has_slot:
                self.route.admission.give_up(self)
        if not self.has_slot:
            raise Shed(QUEUE_TIMEOUT, "route stopped while queued" if self.route.draining
                       else f"no slot within queue-timeout {timeout:g}s")

    def give_slot(self):
        """Hand this queued session the slot another one gave back (from that one's greenlet)."""
        self.has_slot = True
        self.woken.set()

    def refuse(self, reason, why):
        """Refuse this client before forwarding (already counted): record why, tell it
        (a denied client is told nothing)."""
        local.set_error(reason, why)
        if reason != DENIED:
            self.tell(reason)
        return reason

    def tell(self, reason):
        """Tell the client why it is refused, in the route's protocol (protocols/refusal.py:
        the shed-message for plain TCP)."""
        self.context.phase = "refusing"
        route = self.route
        message = route.refusal(reason, self.address)
        if self.tls_end is not None:  # inside the TLS session, best effort
            try:
                self.tls_end.send(message)
            except OSError:
                pass
        elif route.tls is None:  # a TLS client before its handshake would read garbage
            refusal.refuse(self.client, route.config.protocol, message)

    def view(self, stack=False):
        """The admin's view of this connection (bytes as of now, its greenlet, its phase)."""
        context = self.context
        if self.pump is not None:
            context.bytes_up = self.pump.bytes_up + len(self.hello)
            context.bytes_down = self.pump.bytes_down
        view = context.as_dict()
        greenlet = self.greenlet
        view["greenlet"] = greenlet.minimal_ident if greenlet is not None else None
        if stack:
            view["stack"] = local.stack_of(greenlet)
        return view

    def finish(self, end):
        """Close both sockets, give the slot back, log how it ended (once, from ``run``)."""
        context = self.context
        pump = self.pump
        if pump is not None:
            context.bytes_up = pump.bytes_up + len(self.hello)
            context.bytes_down = pump.bytes_down
        route = self.route
        duration = time.monotonic() - self.started
        try:
            try:
                if self.upstream is not None:
                    self.upstream.close()
                    self.destination.disconnected(context.bytes_up, context.bytes_down)
            finally:
                self.client.close()
        finally:
            try:
                if self.has_slot:
                    self.has_slot = False
                    waiting = route.admission.release()
                    if waiting is not None:
                        waiting.give_slot()
                route.session_ended(self, end, duration)
            finally:
                error = local.last_error()
                log_access(context, end, duration, error[1] if error else None)
                route.registry.remove(self)  # last: it tells a paused acceptor there is room
