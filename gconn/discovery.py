"""Destinations that follow DNS: ``dns:NAME:PORT`` (every A/AAAA address of NAME, e.g. a
Kubernetes headless service) and ``srv:_service._proto.NAME`` (SRV records: target, port,
weight; the lowest priority's records are the primaries, the others ``backup``).

One re-arming job per route, once per gconn (in the supervisor's checker, monitor.py, which
publishes what it found to every worker), resolves them with dnspython (through gevent's
patched sockets: cooperative) right away and then every ``resolve-interval``, never on the
data path; each worker hands the set to its route's destinations (destinations.py): an
address that appears is added, one that disappears takes no new connection while its live ones
finish.  A failed or empty lookup keeps the last good set: logged once per episode, counted
(gconn_discovery_failures_total).  ``resolve`` is the pure-ish part (one lookup ->
destination specs).
"""

import dataclasses
import logging
import time

import dns.exception
import dns.inet
import dns.nameserver
import dns.rdatatype
import dns.resolver
import gevent

from . import metrics
from .settings import MAX_WEIGHT, Address

LOGGER = logging.getLogger("gconn.discovery")
LOOKUP_TIMEOUT = 2.0  # seconds one lookup (all its tries) may take


class DiscoveryError(Exception):
    """A lookup that failed or found nothing usable."""


def make_resolver(servers):
    """A dnspython resolver asking ``servers`` ((ip, port) pairs), or the system's."""
    resolver = dns.resolver.Resolver(configure=not servers)
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
    resolver.lifetime = LOOKUP_TIMEOUT
    resolver.cache = None  # every interval asks again: the records are what is followed
    return resolver


def addresses(resolver, name):
    """Every A and AAAA address of ``name`` (A first), as text; DiscoveryError when neither
    answers."""
    found, errors = [], []
    for kind in ("A", "AAAA"):
        try:
            answer = resolver.resolve(name, kind, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise DiscoveryError(f"{name}: no such name") from None
        except dns.exception.DNSException as error:
            errors.append(f"{kind}: {error.__class__.__name__}")
            continue
        found.extend(record.to_text() for record in answer.rrset or ())
    if not found:
        raise DiscoveryError(f"{name}: no address" + (f" ({', '.join(errors)})" if errors
                                                      else ""))
    return found


def resolve(resolver, spec):
    """The destinations ``spec`` (a dns: or srv: destination) stands for now, each a plain
    DestinationSpec carrying the spec's own options; DiscoveryError when the lookup failed or
    found nothing."""
    if spec.discover == "dns":
        return [_concrete(spec, host, spec.address.port) for host in
                sorted(set(addresses(resolver, spec.address.host)), key=_order)]
    try:
        answer = resolver.resolve(spec.address.host, "SRV")
    except dns.exception.DNSException as error:
        raise DiscoveryError(f"{spec.address.host}: SRV: {error.__class__.__name__}") from None
    records = sorted(answer, key=lambda r: (r.priority, r.target.to_text(), r.port))
    if not records:
        raise DiscoveryError(f"{spec.address.host}: no SRV record")
    primary = records[0].priority
    found = []
    for record in records:
        target = record.target.to_text().rstrip(".")
        hosts = [target] if dns.inet.is_address(target) else addresses(resolver, target)
        for host in hosts:
            found.append(_concrete(spec, host, record.port,
                                   backup=spec.backup or record.priority != primary,
                                   weight=min(MAX_WEIGHT, max(1, record.weight))))
    return found


def _order(host):
    return (":" in host, host)  # IPv4 first


def _concrete(spec, host, port, backup=None, weight=None):
    return dataclasses.replace(spec, address=Address("tcp", host=host, port=port),
                               backup=spec.backup if backup is None else backup,
                               weight=spec.weight if weight is None else weight, discover=None)


class Discovery:
    """The resolving job of one route (monitor.Watched: its config, name, destinations, health
    checks and ``changed``)."""

    def __init__(self, route, servers):
        self.route = route
        self.specs = [spec for spec in route.config.destinations if spec.discover]
        self.resolver = make_resolver(servers)
        self.job = None
        self.failing = set()  # specs whose last lookup failed: an episode, logged once
        self.last = {}  # spec -> the destinations it last resolved to
        self.found = None  # what every spec last resolved to together; None: not yet

    def start(self):
        if self.specs:
            self.job = gevent.spawn(self.run)

    def stop(self):
        if self.job is not None:
            self.job.kill(block=False)
            self.job = None

    def run(self):
        interval = self.route.config.resolve_interval
        while True:
            self.refresh()
            gevent.sleep(interval)

    def refresh(self):
        """Resolve every spec once; give the route the union of what each last resolved to."""
        backups = self.route.config.strategy == "round-robin-with-fallback"
        for spec in self.specs:
            try:
                found = resolve(self.resolver, spec)
                if not backups:  # only that strategy has backups: the primaries alone
                    found = [d for d in found if not d.backup] or found
                self.last[spec] = found
            except DiscoveryError as error:
                metrics.discovery_failed(self.route.name)
                if spec not in self.failing:
                    self.failing.add(spec)
                    LOGGER.warning("route=%s %s: lookup failed, keeping the last %d "
                                   "destinations: %s", self.route.name, spec,
                                   len(self.last.get(spec, ())), error)
                continue
            if spec in self.failing:
                self.failing.discard(spec)
                LOGGER.warning("route=%s %s: lookups answer again", self.route.name, spec)
        found = [found for spec in self.specs for found in self.last.get(spec, ())]
        before = self.serving()
        first, self.found = self.found is None, found
        added = self.route.destinations.update(found, time.monotonic())
        self.route.health.watch_new(added)
        self.route.changed(first or self.serving() != before)  # published before it is logged
        if self.serving() != before:
            LOGGER.info("route=%s destinations now %s", self.route.name,
                        ", ".join(self.serving()))

    def serving(self):
        """The names of the route's destinations that take new connections by discovery."""
        return [d.name for d in self.route.destinations.destinations if d.state != "removed"]
