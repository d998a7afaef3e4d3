"""A route's destinations and what is known of each: health, failures, active connections.

This module holds state and its transitions only; it never opens a socket (session.py connects
and reports back).  Health is decided once per gconn: the supervisor's checker (monitor.py)
keeps its own RouteDestinations, applies each check (``check_result``: rise/fall, the good
checks counted in ``passes``) and publishes health and passes; a worker applies them
(``publish``).  A worker's failed connection quarantines the destination in that worker only,
until the checker has had ``rise`` more good checks of it.  Times are monotonic seconds passed
in by the caller so that every transition is testable without waiting.
"""

import random

from .local import RWLock
from .strategies import STRATEGIES

# strategies whose picks slow start thins (HAProxy's slowstart applies to its dynamic
# algorithms only; first-available has no share to grow, source-hash would lose its affinity)
SLOW_STARTS = ("round-robin", "round-robin-with-fallback", "least-connections")


class Destination:
    """One destination of one route, with the counters a strategy and the admin need."""

    __slots__ = ("address", "name", "backup", "send_proxy", "tls", "healthy", "failed_until",
                 "active", "last_error", "connected_total", "failed_total", "check_streak",
                 "bytes_up", "bytes_down", "weight", "base_weight", "state", "generation",
                 "check", "check_port", "passes", "quarantined_until", "warm_since")

    def __init__(self, spec, send_proxy="no", tls=False):
        self.address = spec.address
        self.name = str(spec.address)  # for logs, metrics and the admin, formatted once
        self.backup = spec.backup
        self.send_proxy = spec.send_proxy or send_proxy  # its own PROXY header, or the route's
        self.tls = spec.uses_tls(tls)  # connect over TLS (its own choice, or the route's)
        self.base_weight = 1 if spec.weight is None else spec.weight  # config or runtime
        self.state = "ready"  # set at runtime (runtime.py): ready, drain or maint
        self.weight = self.base_weight  # what strategies see: 0 unless ready
        self.generation = 0  # runtime changes so far (a maint's grace checks it)
        self.check = spec.check  # its own check kind ("no": none); None: the route's
        self.check_port = spec.check_port  # its own check port; None: the route's
        self.healthy = True  # what the checks decided; True until they say otherwise
        self.passes = 0  # good checks so far (a worker's quarantine waits for more of them)
        self.quarantined_until = 0  # passes this worker waits for after a failed connection
        self.warm_since = 0.0  # monotonic time it came back or was discovered (slow start)
        self.failed_until = 0.0  # monotonic time before which a failed destination is skipped
        self.active = 0  # forwarded connections to it right now
        self.last_error = None
        self.connected_total = 0
        self.failed_total = 0
        self.check_streak = 0  # consecutive check results against the current state
        self.bytes_up = 0  # forwarded to it by finished connections (metrics publish these)
        self.bytes_down = 0  # forwarded from it by finished connections

    def __repr__(self):
        return f"<Destination {self.address} active={self.active} healthy={self.healthy}>"

    def set_runtime(self, state=None, weight=None):
        """A runtime change (runtime.py): the state and/or the weight; drain and maint make
        the weight strategies see 0, so no new connection comes here."""
        if state is not None:
            self.state = state
        if weight is not None:
            self.base_weight = weight
        self.weight = self.base_weight if self.state == "ready" else 0
        self.generation += 1

    def available(self, now):
        """Whether a new connection may be sent here at monotonic time ``now``."""
        return (self.healthy and self.passes >= self.quarantined_until
                and now >= self.failed_until)

    def connect_failed(self, now, retry_interval, error):
        """Record a failed connection attempt: skip it for ``retry_interval`` seconds."""
        self.failed_until = now + retry_interval
        self.last_error = error
        self.failed_total += 1

    def connect_succeeded(self):
        """Record a successful connection: it is in rotation again, one more active."""
        self.failed_until = 0.0
        self.active += 1
        self.connected_total += 1

    def disconnected(self, bytes_up, bytes_down):
        """A forwarded connection to this destination ended, having moved these bytes."""
        self.active -= 1
        self.bytes_up += bytes_up
        self.bytes_down += bytes_down

    def check_result(self, ok, rise, fall, now=0.0):
        """Apply one active health check (HAProxy's rise/fall) at monotonic time ``now``: a
        healthy destination goes down after ``fall`` failed checks in a row, a down one comes
        back (its slow start from ``now``) after ``rise`` good ones.  Returns True when this
        check changed ``healthy``."""
        self.passes += ok
        if ok == self.healthy:
            self.check_streak = 0
            return False
        self.check_streak += 1
        if self.check_streak < (rise if ok else fall):
            return False
        self.check_streak = 0
        self.healthy = ok
        if ok:
            self.failed_until = 0.0
            self.warm_since = now
        return True

    def quarantine(self, error, rise):
        """A connection attempt failed while health checks run: out of this worker's rotation
        until the checks have seen it healthy ``rise`` more times (MySQL Router's
        quarantine)."""
        self.quarantined_until = self.passes + rise
        self.last_error = error


class RouteDestinations:
    """A route's destinations, its strategy and its turn counter.

    Sessions read destination state under ``lock.reading()``; health checks write it under
    ``lock.writing()``, so a session never sees a half-applied health transition.
    """

    def __init__(self, specs, strategy, send_proxy="no", tls=False, slow_start=0.0):
        self.send_proxy, self.tls = send_proxy, tls  # the route's, for discovered ones
        self.slow_start = slow_start if strategy in SLOW_STARTS else 0.0
        self.warming = []  # destinations in their slow start (a worker's, from the checker)
        self.static = tuple(Destination(spec, send_proxy, tls) for spec in specs
                            if not spec.discover)
        self.discovered = ()  # what dns: and srv: destinations resolved to (discovery.py)
        self.destinations = self.static
        self.choose = STRATEGIES[strategy]
        self.turn = 0
        self.lock = RWLock()

    def candidates(self, now, client=None):
        """The destinations to try for one new connection (from the host ``client``), in
        order; advances the turn."""
        with self.lock.reading():
            chosen = self.choose(self.destinations, self.turn, now, client)
        self.turn += 1
        if self.warming and len(chosen) > 1:
            return self.warm(chosen, now)
        return chosen

    def warm(self, chosen, now):
        """Slow start: a first candidate in its slow start stays first only with probability
        (time since it came back) / slow-start, else it goes last; so its share of new
        connections grows linearly from nothing to its full share over slow-start."""
        first = chosen[0]
        if first.warm_since and random.random() * self.slow_start > now - first.warm_since:
            return chosen[1:] + [first]
        if any(now - d.warm_since >= self.slow_start for d in self.warming):  # warm now
            self.warming = [d for d in self.warming if now - d.warm_since < self.slow_start]
        return chosen

    def update(self, found, now=None):
        """Make ``found`` (plain specs a lookup gave) the discovered destinations, beside the
        configured ones: one that appears is added (with ``now``, the checker's time, its slow
        start begins unless this is the first set found), one still there keeps its state and
        counts, one that disappeared takes no new connection (state ``removed``) and leaves
        once its live connections ended.  Returns the Destinations added."""
        with self.lock.writing():
            warms = now is not None and bool(self.discovered)
            previous = {d.name: d for d in self.discovered}
            kept, added = {}, []
            for spec in found:
                name = str(spec.address)
                if name in kept:
                    continue
                destination = previous.pop(name, None)
                if destination is None:
                    destination = Destination(spec, self.send_proxy, self.tls)
                    if warms:
                        destination.warm_since = now
                    added.append(destination)
                else:  # its weight stays: one set at runtime wins over the records
                    destination.backup = spec.backup
                    if destination.state == "removed":  # it came back
                        destination.set_runtime("ready")
                kept[name] = destination
            for name, destination in previous.items():  # gone from DNS
                if destination.active:
                    destination.set_runtime("removed")
                    kept[name] = destination
            self.discovered = tuple(kept.values())
            self.destinations = self.static + self.discovered
        return added

    def check_result(self, destination, ok, rise, fall, now):
        """Record a health check on ``destination``; True when its health changed."""
        with self.lock.writing():
            return destination.check_result(ok, rise, fall, now)

    def health(self):
        """What the checker publishes: {name: [healthy, passes, warm_since]} of every
        destination."""
        with self.lock.reading():
            return {d.name: [d.healthy, d.passes, d.warm_since] for d in self.destinations}

    def carry(self, previous):
        """Take over the health found so far from ``previous`` (the same route before a
        reload) for every destination both have."""
        known = {d.name: d for d in previous.destinations}
        with self.lock.writing():
            for destination in self.destinations:
                before = known.get(destination.name)
                if before is not None:
                    destination.healthy, destination.passes = before.healthy, before.passes
                    destination.check_streak = before.check_streak
                    destination.warm_since = before.warm_since

    def publish(self, health, now):
        """Apply the checker's ``health`` ({name: [healthy, passes, warm_since]}) at monotonic
        time ``now`` (the checker's clock: the same CLOCK_MONOTONIC); returns the destinations
        that went (down, up) and those whose quarantine in this worker is over."""
        downs, ups, lifted = [], [], []
        with self.lock.writing():
            for destination in self.destinations:
                found = health.get(destination.name)
                if found is None:
                    continue
                healthy, destination.passes, destination.warm_since = found
                if destination.quarantined_until and \
                        destination.passes >= destination.quarantined_until:
                    destination.quarantined_until = 0
                    destination.failed_until = 0.0
                    lifted.append(destination)
                if healthy != destination.healthy:
                    destination.healthy = healthy
                    (ups if healthy else downs).append(destination)
                    if healthy:
                        destination.failed_until = 0.0
            if self.slow_start:
                self.warming = [d for d in self.destinations
                                if d.warm_since and now - d.warm_since < self.slow_start]
        return downs, ups, lifted

    def quarantine(self, destination, error, rise):
        """Take ``destination`` out of rotation after a failed connection attempt."""
        with self.lock.writing():
            destination.quarantine(error, rise)

    def has_candidates(self, now):
        """Whether the strategy would offer any destination now (the turn does not move)."""
        with self.lock.reading():
            return bool(self.choose(self.destinations, self.turn, now))
