"""Metric definitions (prometheus-client, multiprocess mode) and where their values come from.

The supervisor calls ``setup`` before it forks: it points prometheus-client at a private
directory (PROMETHEUS_MULTIPROC_DIR must be set before the library is imported), so each worker
writes its own files and the admin endpoint sums them (``render``).  A dead worker's gauges
are dropped (``forget``); its counters stay, so totals survive a restart without double
counting.  Nothing here runs per chunk, and nothing touches prometheus-client per connection:
a connection adds to plain ints (most of which the route and destination objects keep
anyway), which ``flush`` publishes once per heartbeat, when the admin endpoint is scraped (it
asks every worker to flush first) and when the worker exits; a worker killed with SIGKILL
loses at most its last second of counts.  Until ``setup`` runs (tests,
gconn-echo) every call is a no-op.
"""

import bisect
import os
import shutil
import tempfile

from .runtime import STATES

SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, float("inf"))  # connect and session
_metrics = None  # the namespace of metric objects once set up
_published = {}  # (counter attribute, labels) -> the data path's total when last published
_observed = {}  # (histogram attribute, route) -> [sum, count per bucket] since the last flush


class _Metrics:
    """The metric objects; created once, before the workers fork."""

    def __init__(self, prometheus):
        counter, gauge, histogram = prometheus.Counter, prometheus.Gauge, prometheus.Histogram
        route = ["route"]
        destination = ["route", "destination"]
        self.accepted = counter("gconn_connections_accepted_total",
                                "Clients accepted by a route's listener", route)
        self.admitted = counter("gconn_connections_admitted_total",
                                "Sessions started (directly or from the queue)", route)
        self.shed = counter("gconn_connections_shed_total",
                            "Clients refused at once, by reason", ["route", "reason"])
        self.ended = counter("gconn_connections_ended_total",
                             "Sessions finished, by how they ended", ["route", "end"])
        self.forwarded = counter("gconn_forwarded_bytes_total",
                                 "Bytes forwarded; up is client to destination",
                                 ["route", "destination", "direction"])
        self.discovery_failures = counter(
            "gconn_discovery_failures_total",
            "Lookups of dns: and srv: destinations that failed or found nothing", route)
        self.spliced = counter("gconn_spliced_bytes_total",
                               "Bytes forwarded by splice, never copied into the process")
        self.destination_connections = counter(
            "gconn_destination_connections_total", "Connections made to a destination",
            destination)
        self.connect_errors = counter("gconn_destination_connect_errors_total",
                                      "Failed connection attempts to a destination", destination)
        self.connect_seconds = histogram("gconn_connect_seconds",
                                         "Time to connect to a destination", route,
                                         buckets=SECONDS_BUCKETS)
        self.session_seconds = histogram("gconn_session_seconds",
                                         "Session duration from accept to close", route,
                                         buckets=SECONDS_BUCKETS)
        self.active = gauge("gconn_connections_active", "Sessions in progress", route,
                            multiprocess_mode="livesum")
        self.queued = gauge("gconn_connections_queued", "Clients waiting for a slot", route,
                            multiprocess_mode="livesum")
        self.limit = gauge("gconn_connections_limit", "max-connections over live workers",
                           route, multiprocess_mode="livesum")
        self.blocked_hosts = gauge("gconn_blocked_hosts", "Client hosts blocked now", route,
                                   multiprocess_mode="livesum")
        self.destination_up = gauge("gconn_destination_up",
                                    "1 when every worker sees the destination healthy",
                                    destination, multiprocess_mode="livemin")
        self.destination_state = gauge(
            "gconn_destination_state", "1 for the state set at runtime (ready, drain, maint)",
            ["route", "destination", "state"], multiprocess_mode="livemax")
        self.worker_connections = gauge("gconn_worker_connections",
                                        "Live connections per worker", ["worker"],
                                        multiprocess_mode="liveall")
        self.worker_fds = gauge("gconn_worker_open_fds", "Open descriptors per worker", ["worker"],
                                multiprocess_mode="liveall")
        self.worker_fd_limit = gauge("gconn_worker_open_fds_limit",
                                     "Open-files limit per worker", ["worker"],
                                     multiprocess_mode="liveall")
        self.worker_rss = gauge("gconn_worker_resident_memory_bytes",
                                "Resident memory per worker", ["worker"],
                                multiprocess_mode="liveall")


def setup():
    """In the supervisor, before any worker forks: a fresh multiprocess directory and the
    metric objects.  Returns the directory (removed by ``teardown``)."""
    global _metrics
    directory = tempfile.mkdtemp(prefix="gconn-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    import prometheus_client
    _metrics = _Metrics(prometheus_client)
    return directory


def teardown(directory):
    """Remove the multiprocess directory at exit."""
    shutil.rmtree(directory, ignore_errors=True)


def enabled():
    return _metrics is not None


def render(directory):
    """The Prometheus text exposition summed over every worker's files."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return generate_latest(registry)


def forget(pid):
    """A worker exited: drop its live gauges (its counters remain in the totals)."""
    if _metrics is not None:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


def observe(name, route, seconds):
    """Observe ``seconds`` on histogram ``name`` (``connect_seconds`` or ``session_seconds``)
    of ``route``: plain ints until ``flush``."""
    if _metrics is None:
        return
    key = (name, route)
    counts = _observed.get(key)
    if counts is None:
        counts = _observed[key] = [0.0] + [0] * len(SECONDS_BUCKETS)  # sum, then buckets
    counts[0] += seconds
    counts[bisect.bisect_left(SECONDS_BUCKETS, seconds) + 1] += 1  # prometheus: value <= bound


def _publish(name, labels, total):
    """Move counter ``name`` up to ``total``, a plain int the data path keeps."""
    key = (name, labels)
    delta = total - _published.get(key, 0)
    if delta > 0:
        metric = getattr(_metrics, name)
        (metric.labels(*labels) if labels else metric).inc(delta)
        _published[key] = total


def flush(routes):
    """Publish what the data path counted since the last flush (heartbeat, scrape, exit).

    Each prometheus update takes a lock, checks the pid and writes the mmap file, far too
    much per connection, so connections only add to plain ints: the route's ``accepted`` and
    ``ended``, its admission's ``admitted`` and ``shed``, each destination's connected, failed
    and byte totals, the histograms' bucket counts here.
    """
    if _metrics is None:
        return
    from .forward import PIPES
    totals = {("spliced", ()): PIPES.spliced}

    def total(name, labels, value):  # a route may list one address twice (weighting)
        totals[(name, labels)] = totals.get((name, labels), 0) + value

    for route in routes:
        name = route.name
        total("accepted", (name,), route.accepted)
        total("admitted", (name,), route.admission.admitted)
        for reason, count in route.admission.shed.items():
            total("shed", (name, reason), count)
        for end, count in route.ended.items():
            total("ended", (name, end), count)
        for destination in route.destinations.destinations:
            address = destination.name
            total("destination_connections", (name, address), destination.connected_total)
            total("connect_errors", (name, address), destination.failed_total)
            total("forwarded", (name, address, "up"), destination.bytes_up)
            total("forwarded", (name, address, "down"), destination.bytes_down)
    for (name, labels), value in totals.items():
        _publish(name, labels, value)
    for (name, route), counts in _observed.items():
        # Histogram.observe one value at a time is ``_sum.inc`` plus one bucket's ``inc``
        # (multiprocess buckets are stored per bucket and summed when rendered)
        child = getattr(_metrics, name).labels(route)
        child._sum.inc(counts[0])
        for bucket, count in zip(child._buckets, counts[1:], strict=True):
            if count:
                bucket.inc(count)
    _observed.clear()


def discovery_failed(route):
    """Count one failed lookup of ``route``'s discovery (in the supervisor; rare)."""
    if _metrics is not None:
        _metrics.discovery_failures.labels(route).inc()


def prime(routes):
    """Create every route's and destination's series at zero (Prometheus practice: a series
    exists before its first event), which also opens this worker's metric files before it
    reports ready, so its descriptor count is steady from then on."""
    if _metrics is None:
        return
    from .admission import SHED_REASONS
    for route in routes:
        name = route.name
        for counter in (_metrics.accepted, _metrics.admitted):
            counter.labels(name).inc(0)
        for reason in SHED_REASONS:
            _metrics.shed.labels(name, reason).inc(0)
        _metrics.connect_seconds.labels(name)
        _metrics.session_seconds.labels(name)
        for destination in route.destinations.destinations:
            address = destination.name
            _metrics.destination_connections.labels(name, address).inc(0)
            _metrics.connect_errors.labels(name, address).inc(0)
            for direction in ("up", "down"):
                _metrics.forwarded.labels(name, address, direction).inc(0)


def publish_state(worker, routes, live, fds, fd_limit, rss, now):
    """Worker ``worker``'s state gauges (its index), once per heartbeat."""
    if _metrics is None:
        return
    for route in routes:
        name = route.name
        _metrics.active.labels(name).set(route.admission.active)
        _metrics.queued.labels(name).set(len(route.admission.waiting))
        _metrics.limit.labels(name).set(route.admission.limit)
        _metrics.blocked_hosts.labels(name).set(route.blocker.blocked_hosts(now))
        for destination in route.destinations.destinations:
            _metrics.destination_up.labels(name, destination.name).set(
                1 if destination.healthy else 0)
            for state in STATES:
                _metrics.destination_state.labels(name, destination.name, state).set(
                    1 if destination.state == state else 0)
    worker = str(worker)
    _metrics.worker_connections.labels(worker).set(live)
    _metrics.worker_fds.labels(worker).set(fds)
    _metrics.worker_fd_limit.labels(worker).set(fd_limit)
    _metrics.worker_rss.labels(worker).set(rss)
