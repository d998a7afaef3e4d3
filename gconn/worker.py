"""One serving process: its hub, one Route per route, its registry, and graceful stop.

On SIGTERM/SIGINT the worker stops accepting (new clients are refused), lets live connections
run for up to shutdown-timeout (joining the routes' forwarding pools), then kills what is left
(each greenlet ends its connection as ``shutdown``); a second signal, or SIGQUIT, stops at
once.  SIGUSR1 reopens the log files.  Signal handlers only set events or call one short
function; the main greenlet does the work.  Post-fork set-up (process title, route shares,
heartbeat, leaving when the supervisor is gone) lives in ``worker_process``.
"""

import ctypes
import dataclasses
import logging
import os
import signal
import time

import gevent
from gevent.event import Event

from . import control, health, log, metrics, runtime
from .control import ControlServer
from .monitor import state_path
from .registry import Registry
from .route import Route
from .sockets import open_sockets, process_usage

LOGGER = logging.getLogger("gconn.worker")

HEARTBEAT_INTERVAL = 1.0  # seconds between a worker's liveness stamps
KILL_GRACE = 5.0  # seconds for killed connection greenlets to finish at the end of a drain
TRIM_MINIMUM = 256  # live connections a wave must reach before its end returns memory


def share(total, workers, index, minimum=1):
    """Worker ``index``'s share of a route limit ``total``: split evenly, remainder first."""
    return max(minimum, total // workers + (1 if index < total % workers else 0))


class Worker:
    """Serves every route of ``config`` in this process until told to stop."""

    def __init__(self, config, worker_id=0, reuse_port=False, listeners=None, changes=None,
                 checked=None):
        self.config = config
        self.changes = changes or {}  # destination states and weights set at runtime
        self.checked = checked  # the checker's last published state (monitor.py), if any
        self.ask_checked = None  # () -> the checker's state now, or None (monitor.py)
        self.registry = Registry(worker_id)
        self.reuse_port = reuse_port
        self.listeners = listeners or {}  # str(address) -> an inherited listening socket
        self.routes = []
        self.stopping = Event()  # first TERM/INT: drain
        self.stop_now = Event()  # second signal or QUIT: close everything at once
        self.on_ready = None  # called once every route listens

    def bind(self):
        """Open every route's listener; on a StartupError close those already open and raise."""
        groups = {}  # routes sharing one bind, told apart by server name (config.py checked)
        for route in self.config.routes:
            groups.setdefault(route.bind if route.bind.fixed else id(route), []).append(route)
        try:
            for configs in groups.values():
                inherited = self.listeners.get(str(configs[0].bind))
                size = sum(config.max_connections + config.max_queued for config in configs)
                first = Route(configs[0], self.registry, self.reuse_port, inherited,
                              pool_size=size)
                routes = [first] + [Route(config, self.registry, shares=first)
                                    for config in configs[1:]]
                self.routes.extend(routes)
                if any(config.server_names for config in configs):
                    first.pick_by_server_name(routes)
        except BaseException:
            for server in self.routes:
                server.stop_accepting()
            raise

    def published(self, state):
        """The checker published ``state``: apply it unless a newer one came first (kept
        for ``run`` when the routes are not bound yet)."""
        if self.checked is not None and state["seq"] <= self.checked["seq"]:
            return
        self.checked = state
        if self.routes:
            health.apply(self.routes, self.registry, state)

    def handle_term(self):
        """TERM/INT: the first drains, the next one stops at once."""
        if self.stopping.is_set():
            self.stop_now.set()
        self.stopping.set()

    def handle_quit(self):
        """QUIT: stop at once, closing every connection."""
        self.stop_now.set()
        self.stopping.set()

    def handle_usr1(self):
        """USR1: reopen the log files (the old ones stay if the new cannot be opened)."""
        try:
            log.setup(self.config.process)
        except OSError as error:
            LOGGER.error("cannot reopen log file %s: %s", error.filename, error.strerror)

    def run(self):
        """Bind, serve until a signal, drain within shutdown-timeout; return the exit code."""
        self.bind()
        if self.ask_checked is not None:  # before serving: the newest health, not the fork's
            asked = self.ask_checked()
            if asked is not None and (self.checked is None
                                      or asked["seq"] >= self.checked["seq"]):
                self.checked = asked
        if self.checked is not None:
            health.apply(self.routes, self.registry, self.checked)
        runtime.apply_all(self.routes, self.registry, self.changes)
        handlers = {signal.SIGTERM: self.handle_term, signal.SIGQUIT: self.handle_quit,
                    signal.SIGUSR1: self.handle_usr1}
        if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:  # not forked by the supervisor
            handlers[signal.SIGINT] = self.handle_term
        for signum, handler in handlers.items():
            gevent.signal_handler(signum, handler)
        for server in self.routes:
            server.start()
        LOGGER.info("worker serving routes=%d", len(self.routes))
        if self.on_ready is not None:
            self.on_ready()
        self.stopping.wait()
        self.drain(self.config.process.shutdown_timeout)
        return 0

    def drain(self, timeout):
        """Stop accepting, join the forwarding pools for up to ``timeout`` seconds (or until a
        second signal), then kill the greenlets still in them."""
        for route in self.routes:
            route.draining = True
            route.stop_accepting()
        for session in self.registry:  # the admin shows who holds the drain up
            if session.context.phase == "forwarding":
                session.context.phase = "draining"
        LOGGER.info("stopping: refusing new connections, draining %d live for up to %.1fs",
                    len(self.registry), 0 if self.stop_now.is_set() else timeout)
        pools = [route.pool for route in self.routes]
        joined = gevent.spawn(lambda: [pool.join() for pool in pools])
        gevent.wait([joined, self.stop_now], timeout=timeout, count=1)
        joined.kill()
        left = sum(len(pool) for pool in pools)
        for pool in pools:
            pool.kill(timeout=KILL_GRACE)
        if left:
            LOGGER.info("closed %d connections still live", left)
        for route in self.routes:
            LOGGER.info("%s", route.summary())
        LOGGER.info("worker stopped live=%d sockets=%d", len(self.registry), open_sockets())


class MemoryTrimmer:
    """Hands freed heap memory back to the OS after a wave of connections has gone.

    CPython and glibc keep freed memory for reuse, so without this a worker stays at the RSS
    of its busiest moment for ever.  malloc_trim(0) costs a few milliseconds, so it runs only
    when live connections fell to half of their peak since the last trim, checked once per
    heartbeat, never on the data path.
    """

    def __init__(self, minimum=TRIM_MINIMUM):
        self.minimum = minimum
        self.peak = 0
        try:
            self.malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim with
            self.malloc_trim = None

    def observe(self, live):
        """Record the live connection count; trim when a large wave has half gone."""
        self.peak = max(self.peak, live)
        if self.malloc_trim and self.peak >= self.minimum and live <= self.peak // 2:
            self.malloc_trim(0)
            self.peak = live


def publish_metrics(worker, index):
    """The worker's counts and state gauges (once per heartbeat, never on the data path)."""
    if not metrics.enabled():
        return
    metrics.flush(worker.routes)
    fds, fd_limit, resident = process_usage()
    metrics.publish_state(index, worker.routes, len(worker.registry), fds, fd_limit, resident,
                          time.monotonic())


def worker_config(config, index, count):
    """``config`` with each route's max-connections replaced by worker ``index``'s share."""
    routes = tuple(dataclasses.replace(
        route, max_connections=share(route.max_connections, count, index),
        max_queued=share(route.max_queued, count, index, minimum=0))
        for route in config.routes)
    return dataclasses.replace(config, routes=routes)


def worker_process(config, index, count, heartbeats, slot, generation, listeners,
                   supervisor_pid, control_dir=None, changes=None, checked=None):
    """The body of a forked worker: title, heartbeat, serve; returns the exit code."""
    try:
        import setproctitle
        setproctitle.setproctitle(f"gconn: worker {index} (generation {generation})")
    except ImportError:
        pass
    worker = Worker(worker_config(config, index, count), worker_id=os.getpid(), reuse_port=True,
                    listeners=listeners, changes=changes, checked=checked)
    control_server = None
    if control_dir is not None:
        control_server = ControlServer(worker, control_dir, index, generation)
        control_server.start()
        worker.ask_checked = lambda: control.ask_one(state_path(control_dir), "health")
    def ready():
        metrics.prime(worker.routes)
        publish_metrics(worker, index)
        heartbeats.set_ready(slot)

    worker.on_ready = ready

    trimmer = MemoryTrimmer()

    def heartbeat():
        """Stamp liveness until the process exits (draining included); leave if orphaned."""
        orphaned = False
        while True:
            heartbeats.beat(slot, worker.registry.clients)
            if worker.stopping.is_set():
                heartbeats.set_draining(slot)
            trimmer.observe(len(worker.registry))
            try:
                publish_metrics(worker, index)
            except Exception:  # a metrics bug must not stop the heartbeat (and get us killed)
                LOGGER.exception("publishing metrics failed")
            if not orphaned and os.getppid() != supervisor_pid:
                orphaned = True
                LOGGER.warning("supervisor pid=%d is gone; draining", supervisor_pid)
                worker.handle_term()
            gevent.sleep(HEARTBEAT_INTERVAL)

    beating = gevent.spawn(heartbeat)
    try:
        return worker.run()
    finally:
        beating.kill()
        metrics.flush(worker.routes)  # what the last sessions counted
        if control_server is not None:
            control_server.stop()
