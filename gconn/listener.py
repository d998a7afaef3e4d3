"""A route's acceptor: a gevent StreamServer on the route's listening socket feeding a bounded
pool of session greenlets.

When the pool is full the server stops accepting until a session ends, so clients past
max-connections wait in the kernel's listen backlog instead of in an unbounded queue in gconn.
The listening socket is made by sockets.listen and closed here when the route stops.
"""

import logging
import os

from gevent.pool import Pool
from gevent.server import StreamServer

from .destinations import RouteDestinations
from .session import serve
from .sockets import bound_address, listen

LOGGER = logging.getLogger("gconn.listener")


class RouteServer:
    """One route in one process: its listener, session pool, destinations and registry."""

    def __init__(self, config, registry, reuse_port=False, listener=None):
        self.config = config
        self.name = config.name
        self.registry = registry
        self.destinations = RouteDestinations(config.destinations, config.strategy)
        self.pool = Pool(config.max_connections)
        self.owns_address = listener is None  # an inherited unix listener is the supervisor's
        self.socket = listener or listen(config.bind, config.backlog, reuse_port=reuse_port)
        self.address = bound_address(self.socket, config.bind)
        self.server = StreamServer(self.socket, self.handle, spawn=self.pool)

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
