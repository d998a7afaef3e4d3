"""A route's acceptor: a gevent StreamServer on the route's listening socket that starts one
session per accepted client, as long as the route's admission has room.

The accept callback runs in the hub (no greenlet per accept); a session spawns its own greenlet
to connect.  When the route is full the server stops accepting until a session ends, so clients
past max-connections wait in the kernel's listen backlog instead of an unbounded queue in gconn.
Accept errors are sorted by class (gevent ``BaseServer._do_read``, trio
``_serve_one_listener``): EBADF/EINVAL/ENOTSOCK close the listener (gevent does that);
EMFILE/ENFILE/ENOBUFS/ENOMEM mean the process is out of a resource, so accepting pauses with
exponential backoff, logged once per episode and counted, and live connections are untouched.
The worker does not wait for EMFILE: once its live connections fill its descriptor capacity
(two per connection), accepting pauses the same way and clients wait in the listen backlog
rather than being accepted only to find no descriptor left for their destination.
The listening socket is made by sockets.listen (or inherited) and closed here.
"""

import logging
import os

from gevent.server import StreamServer

from .admission import Admission
from .destinations import RouteDestinations
from .session import Session
from .sockets import RESOURCE_ERRORS, bound_address, descriptor_capacity, listen

LOGGER = logging.getLogger("gconn.listener")

BACKOFF_MIN = 0.01  # seconds of the first pause after running out of descriptors
BACKOFF_MAX = 0.25  # the longest pause between accept attempts while still out


class Acceptor(StreamServer):
    """StreamServer that pauses, instead of spinning or tracing, when out of descriptors."""

    def __init__(self, listener, handle, route):
        super().__init__(listener, handle, spawn=None)  # handle runs in the hub: no greenlet
        self.route = route
        self.backoff = 0.0  # current pause; 0 while accepting normally
        self.pause_timer = None

    def do_read(self):
        """Accept one client; on resource exhaustion pause accepting and return nothing."""
        if len(self.route.registry) >= self.route.descriptor_capacity:
            self.pause("descriptor capacity reached")
            return None
        try:
            result = super().do_read()
        except OSError as error:
            if error.errno not in RESOURCE_ERRORS:
                raise
            self.pause(error.strerror)
            return None
        if self.backoff:
            LOGGER.warning("route=%s accepting again after running out of descriptors",
                           self.route.name)
            self.backoff = 0.0
        return result

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

    def do_close(self, *args):
        """StreamServer closes the client when the handler returns: here the session owns it."""

    def full(self):
        """Whether the route has no room: BaseServer then stops accepting until ``resume``."""
        return self.route.admission.full()

    def resume(self):
        """Room again after being full: accept again (if still serving)."""
        self._start_accepting_if_started()

    def close(self):
        if self.pause_timer is not None:
            self.pause_timer.close()
            self.pause_timer = None
        super().close()


class RouteServer:
    """One route in one process: its listener, session pool, destinations and registry."""

    def __init__(self, config, registry, reuse_port=False, listener=None):
        self.config = config
        self.descriptor_capacity = descriptor_capacity()
        self.name = config.name
        self.registry = registry
        self.destinations = RouteDestinations(config.destinations, config.strategy)
        self.accept_exhausted = 0  # accept attempts that found the process out of descriptors
        self.owns_address = listener is None  # an inherited unix listener is the supervisor's
        self.socket = listener or listen(config.bind, config.backlog, reuse_port=reuse_port)
        self.address = bound_address(self.socket, config.bind)
        self.server = Acceptor(self.socket, self.handle, self)
        self.admission = Admission(config.max_connections, on_room=self.server.resume)

    def handle(self, client, address):
        """StreamServer's handler, in the hub: one session per accepted client."""
        try:
            Session(self, client, address).start()
        except BaseException:
            client.close()
            raise

    def start(self):
        """Start accepting."""
        self.server.start()
        LOGGER.info("listening route=%s address=%s", self.name, self.address)

    def stop_accepting(self):
        """Close the listener: new clients are refused, live sessions go on."""
        self.server.close()
        if self.config.bind.family == "unix" and self.owns_address:
            try:
                os.unlink(self.config.bind.path)
            except OSError:
                pass
