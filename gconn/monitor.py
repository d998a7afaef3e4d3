"""The supervisor's checker: destination health and DNS discovery found once per gconn and
published to every worker.

For each route with health checks or discovery, the supervisor keeps a ``Watched``: its own
copy of the route's destinations (destinations.py), their check jobs (health.py) and the
route's discovery job (discovery.py).  Those jobs run in the supervisor's hub, so N workers do
not multiply the checks' load or the DNS queries, and a destination is up or down for the whole
gconn at once.  What they found is published over the workers' control sockets (control.py)
as one document: per route the destinations discovery found and each destination's health
and good checks.  A transition (a destination up or down, the discovered set changed) is
published at once, before it is logged; other news (good checks, which lift a worker's
quarantine) within PUBLISH_INTERVAL.  Every publication is the whole state with a sequence
number: a worker that missed one (starting, busy) is whole with the next, and an older one
never overwrites a newer.  A worker started later asks for the state (``STATE_SOCKET`` in the
control directory) once its routes are bound and before it serves, so not even a starting
worker serves on stale health (the state at fork is its fallback).  On a reload
routes whose config did not change keep their jobs (discovery resolves again at once); a
changed route's new jobs start from the health found so far.
"""

import json
import logging
import os
import socket

import gevent
from gevent.server import StreamServer

from . import control
from .destinations import RouteDestinations
from .discovery import Discovery
from .health import HealthChecks, spec_to
from .protocols import tls

LOGGER = logging.getLogger("gconn.monitor")

PUBLISH_INTERVAL = 1.0  # seconds within which news that is not a transition reaches workers
STATE_SOCKET = "checker.sock"  # in the control directory: answers a starting worker's ask


def state_path(control_dir):
    """Where the checker answers with its state."""
    return os.path.join(control_dir, STATE_SOCKET)


def watches(route):
    """Whether route config ``route`` needs the checker: health checks or discovery."""
    return route.check_interval > 0 or any(spec.discover for spec in route.destinations)


class Watched:
    """One route as the checker sees it (what HealthChecks and Discovery ask of a route)."""

    def __init__(self, config, resolvers, changed):
        self.config = config
        self.name = config.name
        self.resolvers = resolvers
        self.changed = changed  # changed(transition): tell the monitor
        self.destinations = RouteDestinations(config.destinations, config.strategy,
                                              config.send_proxy, config.destination_tls)
        self.destination_tls = None
        if config.destination_tls or any(spec.tls for spec in config.destinations):
            self.destination_tls = tls.client_context(
                config.destination_tls_ca, config.destination_tls_cert,
                config.destination_tls_key)
        self.health = HealthChecks(self, changed)
        self.discovery = None
        if any(spec.discover for spec in config.destinations):
            self.discovery = Discovery(self, resolvers)

    def connect_tls(self, connection, destination):
        """The TLS handshake a check completes with ``destination`` (tls.connect_destination)."""
        return tls.connect_destination(connection, self.destination_tls, self.config,
                                       destination)

    def start(self):
        self.health.start()
        if self.discovery is not None:
            self.discovery.start()

    def stop(self):
        self.health.stop()
        if self.discovery is not None:
            self.discovery.stop()

    def take_over(self, previous):
        """Start from what ``previous`` (this route before a reload) found: its discovered
        destinations and every destination's health."""
        if self.discovery is not None and previous.discovery is not None:
            self.discovery.last = {spec: found for spec, found in previous.discovery.last.items()
                                   if spec in self.discovery.specs}
            self.discovery.found = previous.discovery.found
            if self.discovery.found is not None:
                self.destinations.update(self.discovery.found)
        self.destinations.carry(previous.destinations)

    def state(self):
        """This route's part of a publication."""
        entry = {"health": self.destinations.health()}
        if self.discovery is not None and self.discovery.found is not None:
            entry["found"] = [spec_to(spec) for spec in self.discovery.found]
        return entry


class Monitor:
    """Every Watched route of the current config, and the publisher of what they find."""

    def __init__(self, control_dir, pids):
        self.control_dir = control_dir
        self.pids = pids  # () -> the pids of every worker (draining ones too)
        self.watched = {}  # route name -> Watched
        self.seq = 0  # publications so far
        self.dirty = False  # news not yet published
        self.unheard = False  # a worker did not answer the last publication
        self.job = None
        self.server = None  # answers a starting worker's ask for the state

    def configure(self, config):
        """Watch the routes of ``config`` (at start and on each reload)."""
        resolvers = config.process.resolvers
        old, self.watched = self.watched, {}
        for route in config.routes:
            if not watches(route):
                continue
            previous = old.pop(route.name, None)
            if previous is not None and previous.config == route and \
                    previous.resolvers == resolvers:
                self.watched[route.name] = previous
                if previous.discovery is not None:  # resolve again at once, as on start
                    previous.discovery.stop()
                    previous.discovery.start()
                continue
            watched = Watched(route, resolvers, self.changed)
            if previous is not None:
                previous.stop()
                watched.take_over(previous)
            self.watched[route.name] = watched
            watched.start()
        for previous in old.values():
            previous.stop()
        self.dirty = True

    def start(self):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(state_path(self.control_dir))
        listener.listen(64)
        self.server = StreamServer(listener, self.answer)
        self.server.start()
        self.job = gevent.spawn(self.run)

    def answer(self, connection, address):
        """A starting worker asks (control.ask_one): the state."""
        try:
            connection.settimeout(control.ANSWER_TIMEOUT)
            control.read_line(connection)
            connection.sendall(json.dumps(self.state(), separators=(",", ":")).encode())
        except OSError as error:
            LOGGER.debug("state request failed: %s", error)
        finally:
            connection.close()

    def stop(self):
        """Stop every job (the supervisor is stopping)."""
        for watched in self.watched.values():
            watched.stop()
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.job is not None:
            self.job.kill(block=False)
            self.job = None

    def abandon(self):
        """In a forked worker: drop the copied jobs (the supervisor keeps them)."""
        self.stop()

    def state(self):
        """The whole state, as published (and handed to a worker at fork)."""
        return {"seq": self.seq,
                "routes": {name: watched.state() for name, watched in self.watched.items()}}

    def changed(self, transition):
        """A job found something: a transition is published now (before the caller logs
        it), the rest within PUBLISH_INTERVAL."""
        self.dirty = True
        if transition:
            self.publish()

    def run(self):
        while True:
            gevent.sleep(PUBLISH_INTERVAL)
            if self.dirty or self.unheard:
                self.publish()

    def publish(self):
        """Send the whole state to every worker, synchronously."""
        self.dirty = False
        self.seq += 1
        command = "health " + json.dumps(self.state(), separators=(",", ":"))
        answers = control.ask_all(self.control_dir, self.pids(), command)
        self.unheard = any(answer is None for answer in answers.values())
