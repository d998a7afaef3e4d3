"""One client connection's life: admitted, connected to a destination, forwarded, finished.

A session is a greenlet while it connects (the blocking part: name resolution, connect with
timeout, failover), then hands the two sockets to a Pump whose event-loop callbacks move the
bytes, and its greenlet ends: an idle forwarded connection costs no parked greenlet stack
(measured: about 7 KB each).  A connect that completes without waiting (an IP literal on
loopback, a unix socket) needs no greenlet at all: the accept callback starts the pump.
When the pump ends, ``finish`` runs in the hub: it closes both sockets exactly once, releases
the admission slot, removes the session from the registry and writes the access-log line.  It
never reads from the client before a destination is connected (the client's first bytes wait
in the kernel).  What failed where is recorded in the connect greenlet's error state
(local.py) and in the pump, and read by ``finish``.
"""

import logging
import socket
import time

import gevent
from gevent import GreenletExit

from . import local, metrics
from .errors import DestinationUnavailable, NoHealthyDestination, ResourceExhausted
from .forward import Pump
from .log import log_access
from .sockets import begin_connect, complete_connect, connect, peer_name

LOGGER = logging.getLogger("gconn.session")


def connect_destination(route, candidates, attempt=None):
    """Try ``candidates`` in order; return (socket, destination) of the first that connects.
    ``attempt`` is a connect to the first candidate already begun (sockets.begin_connect).
    The socket is owned by the caller.  Raises NoHealthyDestination when there is no
    candidate, DestinationUnavailable when every candidate failed."""
    if not candidates:
        raise NoHealthyDestination(f"route {route.name}: no destination available")
    for destination in candidates:
        begun = time.monotonic()
        try:
            connection = connect(destination.address, route.config.connect_timeout, attempt)
        except DestinationUnavailable as error:
            if route.config.check_interval > 0:  # quarantined until the checks see it rise
                route.destinations.quarantine(destination, str(error))
                LOGGER.warning("route=%s destination %s is down (quarantined)", route.name,
                               destination.address)
            destination.connect_failed(time.monotonic(), route.config.retry_interval, str(error))
            local.set_error("connect_failed", str(error))
            LOGGER.warning("destination %s failed: %s", destination.address, error)
            continue
        finally:
            attempt = None  # begun for the first candidate only
        connected(route, destination, time.monotonic() - begun)
        return connection, destination
    raise DestinationUnavailable(f"route {route.name}: every destination failed")


def connected(route, destination, seconds):
    """Record a connection made to ``destination`` in ``seconds``."""
    destination.connect_succeeded()
    metrics.observe("connect_seconds", route.name, seconds)


class Session:
    """One accepted client of one route, from admission to its access-log line."""

    __slots__ = ("route", "client", "host", "context", "started", "greenlet", "upstream",
                 "destination", "pump", "ended", "aborted")

    def __init__(self, route, client, address, host):
        self.route = route
        self.client = client
        self.host = host  # client_host(address): what max-connect-errors counts
        self.context = local.ConnectionContext(route.registry.next_id(), route.name,
                                               peer_name(address))
        self.started = time.monotonic()
        self.greenlet = None  # the connecting greenlet, while there is one
        self.upstream = None  # the destination socket, once connected
        self.destination = None
        self.pump = None
        self.ended = False
        self.aborted = False  # shutdown asked for while connecting

    def start(self, candidates):
        """Register the (already admitted) session and connect it to one of ``candidates``
        (the strategy's order): at once, in the hub, when the first one's connect completes
        without waiting (an IP literal on loopback or a unix socket), else in a greenlet that
        waits, resolves names and fails over."""
        if self.client.family != socket.AF_UNIX:
            # Nagle on our sends to the client plus its delayed ACK costs ~40 ms per reply
            self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        route = self.route
        route.registry.add(self)
        self.context.phase = "connecting"
        try:
            attempt = begin_connect(candidates[0].address) if candidates else None
        except Exception as error:  # a bug or an unforeseen OS error: this session only
            LOGGER.exception("session failed while connecting", extra={"conn": self.context.id})
            return self.finish(f"error: {error}")
        if attempt is not None and attempt[1] == 0:
            destination = candidates[0]
            try:
                upstream = complete_connect(attempt, destination.address, 0)
            except (OSError, DestinationUnavailable):  # closed; the greenlet tries again
                attempt = None
            else:
                connected(route, destination, 0.0)
                return self.forward(upstream, destination)
        self.greenlet = gevent.spawn_raw(self.connect, candidates, attempt)

    def connect(self, candidates, attempt):
        """The connecting greenlet: connect a candidate, then hand over to a pump."""
        if self.ended:  # aborted before this greenlet first ran
            if attempt is not None and attempt[0] is not None:
                attempt[0].close()
            return
        local.set_current(self.context)
        try:
            upstream, destination = connect_destination(self.route, candidates, attempt)
        except NoHealthyDestination as error:
            LOGGER.warning("%s", error)
            return self.finish("no_destination")
        except DestinationUnavailable as error:
            LOGGER.warning("%s", error)
            return self.finish("connect_failed")
        except ResourceExhausted as error:
            local.set_error("fd_exhausted", str(error))
            LOGGER.warning("%s", error)
            return self.finish("fd_exhausted")
        except GreenletExit:
            return self.finish("shutdown")
        except Exception as error:  # a bug or an unforeseen OS error: report it, serve others
            local.set_error("error", str(error))
            LOGGER.exception("session failed while connecting")
            return self.finish(f"error: {error}")  # the text goes to the access log only
        finally:
            self.greenlet = None
        self.forward(upstream, destination)
        if self.aborted:  # the connect completed in the loop pass that queued the kill
            self.pump.end("shutdown")

    def forward(self, upstream, destination):
        """Connected: hand both sockets to a pump (its callbacks do the rest)."""
        self.upstream = upstream
        self.destination = destination
        self.context.destination = destination.name
        self.context.phase = "forwarding"
        config = self.route.config
        self.pump = Pump(self.client, upstream, config.buffer_size, self.finish, config.splice)
        self.pump.start(config.idle_timeout)

    def view(self):
        """The admin's view of this connection, byte counts as of now."""
        if self.pump is not None:
            self.context.bytes_up = self.pump.bytes_up
            self.context.bytes_down = self.pump.bytes_down
        return self.context.as_dict()

    def abort(self):
        """End the session now (shutdown): stop forwarding or interrupt the connect."""
        if self.pump is not None:
            self.pump.end("shutdown")
        elif self.greenlet:  # connecting: GreenletExit in its connect finishes it (delivered
            # through the hub: a direct throw would never switch back to the caller)
            self.aborted = True
            gevent.kill(self.greenlet, GreenletExit)
        else:  # not yet started: it will see ``ended`` and return at once
            self.finish("shutdown")

    def finish(self, end):
        """Close both sockets, release the slot, log how it ended; runs exactly once."""
        if self.ended:
            return
        self.ended = True
        context = self.context
        context.phase = "closed"
        pump = self.pump
        if pump is not None:
            pump.stop()
            context.bytes_up, context.bytes_down = pump.bytes_up, pump.bytes_down
            if pump.error:
                LOGGER.debug("%s ended: %s", end, pump.error, extra={"conn": context.id})
        try:
            if self.upstream is not None:
                self.upstream.close()
                self.destination.disconnected(context.bytes_up, context.bytes_down)
            self.client.close()
        finally:
            self.route.registry.remove(self)
            duration = time.monotonic() - self.started
            try:
                self.route.session_ended(self, end, duration)  # the slot first, whatever fails
            finally:
                log_access(context, end, duration)
