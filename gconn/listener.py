"""A route's acceptor: a gevent StreamServer on the route's listening socket feeding a bounded
pool of session greenlets.

When the pool is full the server stops accepting until a session ends, so clients past
max-connections wait in the kernel's listen backlog instead of in an unbounded queue in gconn.
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

from gevent.pool import Pool
from gevent.server import StreamServer

from .destinations import RouteDestinations
from .session import serve
from .sockets import RESOURCE_ERRORS, bound_address, descriptor_capacity, listen

LOGGER = logging.getLogger("gconn.listener")

BACKOFF_MIN = 0.01  # seconds of the first pause after running out of descriptors
BACKOFF_MAX = 0.25  # the longest pause between accept attempts while still out


class Acceptor(StreamServer):
    """StreamServer that pauses, instead of spinning or tracing, when out of descriptors."""

    def __init__(self, listener, handle, spawn, route):
        super().__init__(listener, handle, spawn=spawn)
        self.route = route
        self.backoff = 0.0  # current pause; 0 while accepting normally
        self.pause_timer = None

    def do_read(self):
        """Accept one client; on resource exhaustion pause accepting and return nothing."""
        if self.route.worker_sessions() >= self.route.descriptor_capacity:
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
        self.pool = Pool(config.max_connections)
        self.accept_exhausted = 0  # accept attempts that found the process out of descriptors
        self.neighbours = [self]  # every RouteServer of this worker, itself included
        self.owns_address = listener is None  # an inherited unix listener is the supervisor's
        self.socket = listener or listen(config.bind, config.backlog, reuse_port=reuse_port)
        self.address = bound_address(self.socket, config.bind)
        self.server = Acceptor(self.socket, self.handle, self.pool, self)

    def worker_sessions(self):
        """Sessions spawned and not yet finished in this worker, over all its routes."""
        return sum(len(route.pool) for route in self.neighbours)

    def handle(self, client, address):
        """StreamServer's handler: one session per accepted client."""
        serve(self, client, address)

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
