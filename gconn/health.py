"""Active health checks: one re-arming check job per destination, once per gconn (they run
in the supervisor's checker, monitor.py, which publishes what they find to every worker), and
what a worker does with what was published (``apply``).

A route's ``check`` says what a check asks: ``tcp`` (below), ``http`` (GET check-path, the
status must be check-expect-status: Patroni's ``/primary`` on 8008 answers 200 on the primary
only) or ``send-expect`` (send check-send, the answer must match the regular expression
check-expect: Redis's ``INFO replication`` and ``role:master``), on check-port when set; a
destination's own ``check=`` and ``check-port=`` override them (``check=no``: never checked).
Jobs start with a random share of the interval (no herd on start or reload).  In a worker,
with ``on-marked-down = shutdown-sessions`` a destination the checks take down has its live
connections closed (``end=destination_down``), so clients reconnect to one that is up; with
``on-marked-up = shutdown-backup-sessions`` a primary that comes back closes the live
connections of the backups (``end=primary_up``), so clients move back to it.

Each job sleeps check-interval, tries a TCP connect within connect-timeout (with send-proxy,
sends a v1 UNKNOWN or v2 LOCAL PROXY header, as HAProxy's checks do; on a ``protocol = mysql``
route, reads the greeting, logs in as check-user and quits, as HAProxy's ``mysql-check user``
does, so the server does not block gconn's host for aborted handshakes), closes it, and
hands the result to the destination's rise/fall state (destinations.py, under the route's
write lock).  389 DS nunc-stans' lesson: periodic jobs that re-arm themselves.  A check that
cannot even open a socket (this process out of descriptors) gives no verdict.
"""

import logging
import random
import re
import socket
import time

import gevent

from . import runtime
from .errors import DestinationUnavailable, ResourceExhausted
from .protocols import mysql, proxy
from .settings import Address, DestinationSpec
from .sockets import connect, receive_within, send_within

ANSWER_LIMIT = 65536  # bytes of a check's answer read at most

LOGGER = logging.getLogger("gconn.health")


class HealthChecks:
    """The check jobs of one route (monitor.Watched: its config, name, destinations and
    connect_tls); ``changed(transition)`` is called after each check that counted, with
    whether it changed a destination's health."""

    def __init__(self, route, changed):
        self.route = route
        self.changed = changed
        self.jobs = []

    def start(self):
        """Start one job per checked destination (none when check-interval is 0)."""
        self.jobs = []
        self.watch_new(self.route.destinations.destinations)

    def watch_new(self, destinations):
        """Check ``destinations`` too (added by discovery), when checks run."""
        if self.route.config.check_interval > 0:
            self.jobs += [gevent.spawn(self.watch, destination) for destination in destinations
                          if destination.check != "no"]

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
        """Check ``destination`` every check-interval for as long as the route serves, the
        first time after a random share of it."""
        config = self.route.config
        gevent.sleep(random.uniform(0, config.check_interval))
        while True:
            if destination not in self.route.destinations.destinations:
                return  # discovery dropped it
            try:
                ok = self.probe(destination)
            except DestinationUnavailable:
                ok = False
            except ResourceExhausted:
                ok = None  # no verdict
            if ok is not None:
                transition = self.route.destinations.check_result(
                    destination, ok, config.rise, config.fall, time.monotonic())
                self.changed(transition)  # published to the workers before it is logged
                if transition:
                    LOGGER.warning("route=%s destination %s is %s", self.route.name,
                                   destination.address, "up" if ok else "down")
            gevent.sleep(config.check_interval)

    def probe(self, destination):
        """One check of ``destination``: True when it answered as expected (False when it
        answered otherwise); DestinationUnavailable when it could not be reached."""
        config = self.route.config
        address = destination.address
        kind = destination.check or config.check
        port = destination.check_port or config.check_port
        if port:
            address = Address("tcp", host=address.host, port=port)
        connection = connect(address, config.connect_timeout, config.source)
        try:
            if kind == "http":
                return self.http(connection, address)
            if kind == "send-expect":
                return self.send_expect(connection)
            if destination.send_proxy != "no":  # it expects a header: send one
                proxy.send_header(connection, proxy.check_header(destination.send_proxy),
                                  config.connect_timeout)
            if destination.tls:  # a TLS destination must complete a handshake
                self.check_tls(connection, destination)
            elif config.protocol == "mysql":
                mysql.check(connection, config.check_user, config.connect_timeout)
            return True
        finally:
            connection.close()

    def exchange(self, connection, request, done):
        """Send ``request`` and read the answer until ``done(answer)``, the peer's end, the
        limit or connect-timeout; the answer read."""
        deadline = time.monotonic() + self.route.config.connect_timeout
        try:
            if request and not send_within(connection, request, deadline):
                return b""
            answer = b""
            while not done(answer) and len(answer) < ANSWER_LIMIT:
                data = receive_within(connection, ANSWER_LIMIT - len(answer), deadline)
                if not data:
                    break
                answer += data
        except OSError as error:
            raise DestinationUnavailable(f"check: {error.strerror or error}") from None
        return answer

    def http(self, connection, address):
        """GET check-path; whether the status is check-expect-status."""
        config = self.route.config
        request = (f"GET {config.check_path} HTTP/1.0\r\nHost: {address.host}\r\n"
                   f"User-Agent: gconn-check\r\nConnection: close\r\n\r\n").encode()
        answer = self.exchange(connection, request, lambda data: b"\r\n" in data)
        words = answer.split(b"\r\n", 1)[0].split()
        return len(words) >= 2 and words[1] == str(config.check_expect_status).encode()

    def send_expect(self, connection):
        """Send check-send; whether the answer matches check-expect."""
        config = self.route.config
        pattern = re.compile(config.check_expect.encode("latin-1"))
        answer = self.exchange(connection, config.check_send,
                               lambda data: pattern.search(data) is not None)
        return pattern.search(answer) is not None


class DestinationDown(runtime.Maintenance):
    """Kills a session whose destination the checks took down (end ``destination_down``)."""

    END = "destination_down"


class PrimaryUp(runtime.Maintenance):
    """Kills a session on a backup when a primary came back (end ``primary_up``)."""

    END = "primary_up"


def apply(routes, registry, state):
    """Apply the checker's published ``state`` in this worker: the destinations discovery
    found, then each destination's health; end the sessions on-marked-down and on-marked-up
    ask to end."""
    for route in routes:
        entry = state["routes"].get(route.name)
        if entry is None:
            continue
        if "found" in entry:
            route.destinations.update([spec_from(found) for found in entry["found"]])
        downs, ups, lifted = route.destinations.publish(entry["health"], time.monotonic())
        for destination in lifted:
            LOGGER.warning("route=%s destination %s is up (quarantine over)", route.name,
                           destination.address)
        config = route.config
        if config.on_marked_down == "shutdown-sessions":
            for destination in downs:
                runtime.end_sessions(registry, destination, DestinationDown)
        if config.on_marked_up == "shutdown-backup-sessions" and \
                any(not destination.backup for destination in ups):
            for destination in route.destinations.destinations:
                if destination.backup:
                    runtime.end_sessions(registry, destination, PrimaryUp)


def spec_to(spec):
    """A plain destination spec (one discovery found) as JSON-ready data."""
    return {"host": spec.address.host, "port": spec.address.port, "backup": spec.backup,
            "send_proxy": spec.send_proxy, "tls": spec.tls, "weight": spec.weight,
            "check": spec.check, "check_port": spec.check_port}


def spec_from(data):
    """The destination spec ``spec_to`` gave ``data`` for."""
    return DestinationSpec(Address("tcp", host=data["host"], port=data["port"]),
                           data["backup"], data["send_proxy"], data["tls"], data["weight"],
                           None, data["check"], data["check_port"])
