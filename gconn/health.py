"""Active health checks: one re-arming check job per destination, not one per connection.

Each job sleeps check-interval, tries a TCP connect within connect-timeout (with send-proxy,
sends a v1 UNKNOWN or v2 LOCAL PROXY header, as HAProxy's checks do; on a ``protocol = mysql``
route, reads the greeting, logs in as check-user and quits, as HAProxy's ``mysql-check user``
does, so the server does not block gconn's host for aborted handshakes), closes it, and
hands the result to the destination's rise/fall state (destinations.py, under the route's
write lock).  389 DS nunc-stans' lesson: periodic jobs that re-arm themselves.  A check that
cannot even open a socket (this process out of descriptors) gives no verdict.
"""

import logging
import socket

import gevent

from .errors import DestinationUnavailable, ResourceExhausted
from .protocols import mysql, proxy
from .sockets import connect

LOGGER = logging.getLogger("gconn.health")


class HealthChecks:
    """The check jobs of one route in one worker."""

    def __init__(self, route):
        self.route = route
        self.jobs = []

    def start(self):
        """Start one job per destination (none when check-interval is 0)."""
        if self.route.config.check_interval > 0:
            self.jobs = [gevent.spawn(self.watch, destination)
                         for destination in self.route.destinations.destinations]

    def watch_new(self, destinations):
        """Check ``destinations`` too (added by discovery), when checks run."""
        if self.route.config.check_interval > 0 and self.jobs:
            self.jobs += [gevent.spawn(self.watch, destination) for destination in destinations]

    def stop(self):
        """Stop every job."""
        gevent.killall(self.jobs, block=False)
        self.jobs = []

    def check_tls(self, connection, destination):
        """Complete a TLS handshake with ``destination`` (verified as the sessions verify it),
        then say goodbye with a close_notify; DestinationUnavailable when it fails."""
        end = self.route.connect_tls(connection, destination)
        try:
            end.shutdown(socket.SHUT_WR)
        except OSError:  # the goodbye is a courtesy
            pass

    def watch(self, destination):
        """Check ``destination`` every check-interval for as long as the route serves."""
        config = self.route.config
        while True:
            gevent.sleep(config.check_interval)
            if destination not in self.route.destinations.destinations:
                return  # discovery dropped it
            try:
                connection = connect(destination.address, config.connect_timeout,
                                     config.source)
                try:
                    if destination.send_proxy != "no":  # it expects a header: send one
                        proxy.send_header(connection, proxy.check_header(destination.send_proxy),
                                          config.connect_timeout)
                    if destination.tls:  # a TLS destination must complete a handshake
                        self.check_tls(connection, destination)
                    elif config.protocol == "mysql":
                        mysql.check(connection, config.check_user, config.connect_timeout)
                finally:
                    connection.close()
                ok = True
            except DestinationUnavailable:
                ok = False
            except ResourceExhausted:
                continue
            if self.route.destinations.check_result(destination, ok, config.rise, config.fall):
                LOGGER.warning("route=%s destination %s is %s", self.route.name,
                               destination.address, "up" if ok else "down")
