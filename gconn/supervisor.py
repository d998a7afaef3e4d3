"""The pre-fork master: reserves the routes' addresses, forks workers, keeps them alive, and
turns signals into actions (gunicorn's arbiter is the model).

Signal handlers only enqueue the signal; the main loop dispatches it to ``handle_<name>``, so
those methods are the signal table.  Pre-fork work touches no per-process state: each worker
re-initialises its hub, installs its own signals and leaves when the supervisor is gone.
Workers report liveness by writing a monotonic timestamp into a shared page; a worker silent
for worker-timeout is killed and replaced, a worker that dies is restarted with backoff.
Asking the workers what they hold is the admin's (fleet.py); the supervisor only hands it a
roster of its current workers.  Destination health checks and DNS discovery run here, once
for the whole gconn (monitor.py), and are published to every worker.  Only the supervisor
speaks to systemd (notify.py), takes the sockets it hands over (activation.py) and hands its
own to the next supervisor on USR2 (upgrade.py).
"""

import dataclasses
import errno
import logging
import os
import shutil
import signal
import tempfile
import time

import gevent
from gevent.queue import Empty, Queue

from . import activation, control, log, metrics, runtime, upgrade
from .admin import Admin
from .bindings import Bindings
from .capacity import capacity_warnings, certificate_warnings, worker_count
from .config import load
from .errors import ConfigError, StartupError
from .fleet import Fleet, Roster
from .heartbeat import Heartbeats
from .monitor import Monitor
from .notify import Notifier
from .sockets import raise_open_files_limit
from .worker import worker_process

LOGGER = logging.getLogger("gconn.supervisor")

LOOP_TICK = 0.5  # seconds the supervisor waits for a signal before checking its workers
STARTING_TICK = 0.02  # the same while a generation of workers is starting
RESTART_BACKOFF_MIN = 0.1  # seconds before restarting a worker that died young
RESTART_BACKOFF_MAX = 10.0  # the longest wait between restarts of a worker that keeps dying
# a dead worker's listening sockets keep their clients queued for its replacement when that
# comes within this many seconds; a worker kept down longer (dying young again and again)
# has them closed, so that new clients go to the other workers
HOLD_FOR_REPLACEMENT = 1.0
YOUNG = 5.0  # seconds: a worker that dies younger than this counts towards backoff
KILL_GRACE = 5.0  # seconds between TERM and KILL for a worker that overruns its drain
# a worker whose heartbeat is older than this withholds systemd's watchdog ping (workers stamp
# every second; systemd acts only when pings stay away for WatchdogSec)
HEARTBEAT_LATE = 3.0
UPGRADE_ANSWER = 10.0  # seconds a new supervisor waits for the old one to hand over
SIGNALS = ("TERM", "INT", "QUIT", "HUP", "USR1", "USR2", "TTIN", "TTOU", "CHLD")
HELD_SIGNALS = {getattr(signal, f"SIG{name}") for name in SIGNALS if name != "CHLD"}


def describe_exit(code):
    """``exit code N`` or ``signal NAME`` (``signal N`` for one without a name)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


@dataclasses.dataclass
class WorkerProcess:
    """What the supervisor knows of one worker process."""

    index: int
    generation: int
    pid: int
    slot: int
    started: float
    retiring: bool = False  # told to drain (reload or stop); not replaced when it exits
    kill_at: float | None = None  # monotonic time to escalate to SIGKILL
    hard_stop_at: float | None = None  # monotonic time hard-stop-after ends its drain


class Supervisor:
    """Forks and tends the workers of one gconn; ``run`` returns the exit code."""

    def __init__(self, config, argv=None, admin_token=None):
        self.config = config
        self.argv = argv
        self.admin = None
        self.admin_token = admin_token
        self.metrics_dir = None
        self.control_dir = tempfile.mkdtemp(prefix="gconn-control-")  # workers' sockets
        self.generation = 0
        self.workers = {}  # pid -> WorkerProcess
        self.signals = Queue()
        self.heartbeats = Heartbeats()
        self.restart_after = {}  # worker index -> monotonic time its replacement may start
        self.deaths = {}  # worker index -> consecutive young deaths
        self.added_workers = 0  # workers TTIN added (TTOU took away) on top of the config's
        self.stopping = False
        self.stop_at = None  # monotonic time the shutdown-delay after a TERM ends; None: none
        self.signal_handles = []
        self.outgoing = []  # the previous generation, retired once the new one is ready
        self.announced = frozenset()  # the worker pids whose readiness was last logged
        self.open_files = raise_open_files_limit()
        # destination states and weights set at runtime: (route, destination) -> {"state",
        # "weight"}; they win over the config until set again, survive reloads, and are
        # handed to every worker started later (and kept in state-file, if set)
        self.changes = runtime.read_state_file(config.process.state_file)
        self.monitor = Monitor(self.control_dir, lambda: list(self.workers))
        self.notifier = Notifier()  # systemd's notify socket, when NOTIFY_SOCKET is set
        # sockets handed over at start: systemd's (LISTEN_FDS), and when an upgrade (USR2)
        # started us the old supervisor's, which become ours; we then stay silent to systemd
        # until the old one has made us its main process
        inherited, slots, reservations, self.admin_socket = upgrade.adopt(
            activation.inherited_sockets(bound_only=upgrade.is_reservation))
        self.bindings = Bindings(inherited, slots, reservations)  # the routes' addresses
        self.upgrade_channel = upgrade.channel_from_environment()  # to the old supervisor
        if self.upgrade_channel is not None:
            self.notifier.mute()
        self.upgrading = None  # (pid, socket pair end) of the new supervisor USR2 started

    # --- start -----------------------------------------------------------------------------

    def check_capacity(self, config):
        """Log each capacity and certificate warning for ``config`` (``capacity_warnings``,
        ``certificate_warnings``)."""
        for warning in capacity_warnings(config, self.open_files) + certificate_warnings(config):
            LOGGER.warning("%s", warning)

    def run(self):
        """Start the workers, then dispatch signals and tend workers until stopped."""
        self.config = self.bindings.reserve(self.config)
        self.prune_slot_listeners()  # an upgrade's sockets for worker indexes we do not have
        self.check_capacity(self.config)
        self.metrics_dir = metrics.setup()  # before any fork: workers inherit the metrics
        self.monitor.configure(self.config)
        self.monitor.start()
        process = self.config.process
        if process.admin is not None:
            fleet = Fleet(self.control_dir, self.roster, self.heartbeats)
            self.admin = Admin(process.admin, self.admin_token, fleet, self.metrics_dir,
                               lambda: self.config, changer=self, sock=self.admin_socket)
            self.admin.start()
        for name in SIGNALS:
            signum = getattr(signal, f"SIG{name}")
            self.signal_handles.append(gevent.signal_handler(signum, self.signals.put, name))
        self.spawn_workers()
        LOGGER.info("supervisor pid=%d workers=%d", os.getpid(), self.worker_target())
        while self.workers or not self.stopping:
            try:
                starting = any(not self.heartbeats.ready(w.slot) for w in self.workers.values()
                               if not w.retiring)
                tick = STARTING_TICK if starting else LOOP_TICK
                tick = min(tick, self.delay_left(), self.notifier.watchdog_tick())
                name = self.signals.get(timeout=tick)
            except Empty:
                name = None
            if name is not None:
                getattr(self, f"handle_{name.lower()}")()
            self.reap_workers()
            self.end_delay()
            if not self.stopping:
                self.check_heartbeats()
                self.spawn_workers()
                self.announce_ready()
            self.escalate()
            self.notifier.watchdog(self.workers_healthy())
            if self.notifier.enabled:
                self.notifier.status(self.status_line())
        self.monitor.stop()  # draining workers kept hearing the checks until the end
        if self.admin is not None:
            self.admin.stop()
        shutil.rmtree(self.control_dir, ignore_errors=True)
        metrics.teardown(self.metrics_dir)
        LOGGER.info("stopped")
        return 0

    # --- signals ---------------------------------------------------------------------------

    def handle_term(self):
        """Drain: /readyz fails at once, workers serve on for shutdown-delay, then stop
        accepting and finish within shutdown-timeout; then exit.  A second TERM skips what is
        left of the delay, a third stops at once."""
        delay = self.config.process.shutdown_delay
        if self.stop_at is not None:
            LOGGER.info("signal again: skipping the rest of shutdown-delay")
        elif delay and not self.stopping:
            self.notifier.stopping()
            self.stop_at = time.monotonic() + delay
            LOGGER.info("stopping: /readyz fails now; still accepting for shutdown-delay "
                        "%.1fs, then draining", delay)
            return
        self.stop_at = None
        self.stop(signal.SIGTERM, self.config.process.shutdown_timeout + KILL_GRACE)

    def handle_int(self):
        """Like TERM (Ctrl-C)."""
        self.handle_term()

    def handle_quit(self):
        """Fast stop: workers close every connection now (no shutdown-delay)."""
        self.stop_at = None
        self.stop(signal.SIGQUIT, KILL_GRACE)

    def handle_hup(self):
        """Reload: new workers take new connections with the re-read config; the old ones
        drain once every new one serves, so no moment is without a listener."""
        if self.stopping or self.stop_at is not None:
            LOGGER.warning("reload ignored: stopping")
            return
        self.notifier.reloading()
        try:
            config, _ = load(self.argv)
            config = self.bindings.reserve(config)
            log.setup(config.process)
        except (ConfigError, StartupError) as error:
            LOGGER.error("reload failed, keeping the running config: %s", error)
            self.notifier.ready(f"reload failed, running the previous config: {error}")
            return
        except OSError as error:
            LOGGER.error("reload failed, keeping the running config: cannot open log file "
                         "%s: %s", error.filename, error.strerror)
            self.notifier.ready(f"reload failed, running the previous config: cannot open "
                                f"log file {error.filename}")
            return
        LOGGER.info("reloading: generation %d", self.generation + 1)
        if self.added_workers and config.process.workers != self.config.process.workers:
            LOGGER.info("workers changed in the config: TTIN/TTOU's %+d dropped",
                        self.added_workers)
            self.added_workers = 0
        self.config = config
        self.monitor.configure(config)
        known = {(route.name, str(spec.address)) for route in config.routes
                 for spec in route.destinations}
        discovering = {route.name for route in config.routes
                       if any(spec.discover for spec in route.destinations)}
        for key in [key for key in self.changes
                    if key not in known and key[0] not in discovering]:
            del self.changes[key]  # its route or destination left the config
        self.prune_slot_listeners()
        self.check_capacity(config)
        self.outgoing.extend(w for w in self.workers.values() if not w.retiring)
        self.generation += 1
        self.restart_after.clear()
        self.deaths.clear()
        self.spawn_workers()

    def handle_usr1(self):
        """Reopen log files (after rotation), here and in every worker."""
        try:
            log.setup(self.config.process)
        except OSError as error:
            LOGGER.error("cannot reopen log file %s: %s", error.filename, error.strerror)
        for worker in self.workers.values():
            self.kill(worker.pid, signal.SIGUSR1)

    def handle_ttin(self):
        """Add a worker (kept across reloads until the config's workers changes)."""
        if self.stopping or self.stop_at is not None:
            LOGGER.warning("TTIN ignored: stopping")
            return
        self.added_workers += 1
        LOGGER.info("adding worker %d: %d workers", self.worker_target() - 1,
                    self.worker_target())
        self.spawn_workers()

    def handle_ttou(self):
        """Remove the highest-numbered worker: it drains like a reload's old generation."""
        if self.stopping or self.stop_at is not None:
            LOGGER.warning("TTOU ignored: stopping")
            return
        if self.worker_target() <= 1:
            LOGGER.warning("TTOU ignored: one worker left")
            return
        self.added_workers -= 1
        removed = [w for w in self.current_workers() if w.index >= self.worker_target()]
        for worker in removed:
            LOGGER.info("removing worker %d pid=%d: draining; %d workers", worker.index,
                        worker.pid, self.worker_target())
        self.retire_generation(removed)
        # its listening sockets leave the SO_REUSEPORT group now, so the kernel sends new
        # clients to the others (those queued in its own at this instant are reset unless
        # net.ipv4.tcp_migrate_req moves them)
        self.prune_slot_listeners()
        self.restart_after.pop(self.worker_target(), None)

    def handle_usr2(self):
        """Upgrade: run the installed program again with every listening socket; once its
        workers serve it takes over and this supervisor drains (as a reload) and exits."""
        if self.stopping or self.stop_at is not None or self.upgrading is not None:
            LOGGER.warning("upgrade ignored: %s", "one is under way" if self.upgrading
                           else "stopping")
            return
        sockets = upgrade.handover(self.bindings.slot_listeners, self.bindings.reservations,
                                   self.admin.socket if self.admin is not None else None,
                                   self.bindings.inherited)
        try:
            pid, channel = upgrade.spawn(self.argv or [], sockets, self.notifier.environment(),
                                         HELD_SIGNALS)
        except OSError as error:
            LOGGER.error("upgrade failed: cannot start the new supervisor: %s", error.strerror)
            return
        LOGGER.info("upgrading: new supervisor pid=%d started with %d sockets", pid,
                    len(sockets))
        self.upgrading = (pid, channel)
        gevent.spawn(self.await_upgrade, channel)

    def await_upgrade(self, channel):
        """Wait for the new supervisor's word (or its end) and queue it for the loop."""
        try:
            said = channel.recv(len(upgrade.READY))
        except OSError:
            said = b""
        self.signals.put("UPGRADED" if said == upgrade.READY else "UPGRADE_FAILED")

    def handle_upgraded(self):
        """The new supervisor serves: make it systemd's main process, hand it the sockets
        for good and drain (as a reload), then exit; no STOPPING=1."""
        pid, channel = self.upgrading
        self.notifier.send(mainpid=pid, ready=1)
        self.notifier.mute()
        try:
            channel.sendall(upgrade.MAIN)
        except OSError:
            pass
        channel.close()
        if self.admin is not None:  # the new supervisor answers on the same socket
            self.admin.stop()
            self.admin = None
        self.bindings.give_up()  # the new supervisor holds them now
        self.stopping = True
        self.outgoing.clear()
        workers = [w for w in self.workers.values() if not w.retiring]
        LOGGER.info("upgraded: supervisor pid=%d serves; draining %d workers", pid,
                    len(workers))
        self.retire_generation(workers)

    def handle_upgrade_failed(self):
        """The new supervisor ended before it served: this one goes on as before."""
        if self.upgrading is None or self.stopping:  # already known, or it took over
            return
        pid, channel = self.upgrading
        channel.close()
        self.upgrading = None
        LOGGER.error("upgrade failed: new supervisor pid=%d ended before serving; still "
                     "serving", pid)

    def confirm_upgrade(self):
        """Started by an upgrade and now serving: tell the old supervisor, and speak to
        systemd once it has made us the main process."""
        channel, self.upgrade_channel = self.upgrade_channel, None
        try:
            channel.settimeout(UPGRADE_ANSWER)
            channel.sendall(upgrade.READY)
            answer = channel.recv(len(upgrade.MAIN))
        except OSError:
            answer = b""
        channel.close()
        if answer != upgrade.MAIN:
            LOGGER.warning("the old supervisor did not answer the upgrade; not speaking to "
                           "systemd")
            return
        self.notifier.mute(False)
        self.notifier.status(self.status_line())

    def handle_chld(self):
        """A worker changed state: reaped in the loop."""

    # --- runtime changes (the admin's POSTs) -------------------------------------------------

    def set_destination(self, route_name, destination_name, state=None, weight=None, grace=0.0):
        """Set a destination's state and/or weight in every worker now and in every worker
        started later; ValueError when the route or destination is unknown.  Returns what
        the workers answered."""
        route = next((r for r in self.config.routes if r.name == route_name), None)
        if route is None:
            raise ValueError(f"no route {route_name!r}")
        if not any(spec.discover for spec in route.destinations) and \
                destination_name not in {str(spec.address) for spec in route.destinations}:
            raise ValueError(f"route {route_name} has no destination {destination_name!r}")
        change = self.changes.setdefault((route_name, destination_name), {})
        if state is not None:
            change["state"] = state
        if weight is not None:
            change["weight"] = weight
        runtime.write_state_file(self.config.process.state_file, self.changes)
        command = (f"set {route_name} {destination_name} {state or '-'} "
                   f"{'-' if weight is None else weight} {grace:g}")
        return self.tell_workers(command)

    def unblock(self, route_name, host):
        """Lift a blocked client host on a route in every worker; ValueError for an unknown
        route."""
        if not any(r.name == route_name for r in self.config.routes):
            raise ValueError(f"no route {route_name!r}")
        return self.tell_workers(f"unblock {route_name} {host}")

    def tell_workers(self, command):
        """Send ``command`` to every worker (draining ones too: their live connections are
        the ones a maint ends); {"workers": answered, "answers": [...]}."""
        answers = control.ask_all(self.control_dir, list(self.workers), command)
        return {"workers": sum(1 for a in answers.values() if a is not None),
                "answers": [a for a in answers.values() if a is not None]}

    # --- workers ---------------------------------------------------------------------------

    def delay_left(self):
        """Seconds until the shutdown-delay ends (infinite when none runs)."""
        if self.stop_at is None:
            return float("inf")
        return max(0.0, self.stop_at - time.monotonic())

    def end_delay(self):
        """When the shutdown-delay has run out, tell the workers to drain."""
        if self.stop_at is not None and time.monotonic() >= self.stop_at:
            self.stop_at = None
            LOGGER.info("shutdown-delay over: draining")
            self.stop(signal.SIGTERM, self.config.process.shutdown_timeout + KILL_GRACE)

    def stop(self, signum, grace):
        """Tell every worker to stop with ``signum``; a second stop escalates to QUIT."""
        if self.stopping and signum == signal.SIGTERM:
            signum, grace = signal.SIGQUIT, KILL_GRACE
        self.notifier.stopping()
        self.stopping = True
        self.bindings.release_all()
        self.outgoing.clear()
        self.retire(list(self.workers.values()), signum, grace)

    def retire(self, workers, signum, grace):
        """Send ``signum`` to ``workers`` and kill them if still alive after ``grace`` seconds."""
        deadline = time.monotonic() + grace
        for worker in workers:
            worker.retiring = True
            worker.kill_at = deadline if worker.kill_at is None else min(worker.kill_at, deadline)
            self.kill(worker.pid, signum)

    def retire_generation(self, workers):
        """Drain ``workers`` (an old generation, or a worker TTOU removes) within
        shutdown-timeout, or hard-stop-after when that is set and sooner."""
        self.retire(workers, signal.SIGTERM, self.config.process.shutdown_timeout + KILL_GRACE)
        hard_stop_after = self.config.process.hard_stop_after
        if hard_stop_after:
            for worker in workers:
                worker.hard_stop_at = time.monotonic() + hard_stop_after

    def worker_target(self):
        """How many workers the current generation has: the config's, plus TTIN, less TTOU."""
        return max(1, worker_count(self.config) + self.added_workers)

    def current_workers(self):
        """The workers of the current generation that are not retiring."""
        return [w for w in self.workers.values()
                if w.generation == self.generation and not w.retiring]

    def wanted_indexes(self):
        """Worker indexes of the current generation that have no live process."""
        live = {w.index for w in self.current_workers()}
        return [index for index in range(self.worker_target()) if index not in live]

    def roster(self):
        """Who the current workers are and who is missing (what the admin's fleet asks)."""
        return Roster(self.generation, self.stopping or self.stop_at is not None,
                      tuple(self.current_workers()),
                      tuple(self.wanted_indexes()),
                      tuple(w for w in self.workers.values() if w.retiring))

    def spawn_workers(self):
        """Fork the missing workers of the current generation (respecting restart backoff);
        deferred while an admin request is being served."""
        if self.admin is not None and self.admin.busy:
            return
        now = time.monotonic()
        for index in self.wanted_indexes():
            if self.restart_after.get(index, 0) > now:
                continue
            self.spawn_worker(index)

    def prune_slot_listeners(self, index=None):
        """Close the kept listening sockets no current worker will take over (a route gone
        or moved, a worker index beyond the count), or worker ``index``'s."""
        self.bindings.prune(self.config, self.worker_target(), index)

    def spawn_worker(self, index):
        """Fork one worker; the child never returns from here."""
        try:
            listeners = self.bindings.listeners_for(self.config, index)
        except StartupError as error:
            LOGGER.error("worker %d not started: %s; retrying", index, error)
            self.restart_after[index] = time.monotonic() + RESTART_BACKOFF_MAX
            return
        slot = self.heartbeats.take()
        if slot is None:
            LOGGER.error("no heartbeat slot free for worker %d; retrying", index)
            self.restart_after[index] = time.monotonic() + RESTART_BACKOFF_MAX
            return
        supervisor_pid = os.getpid()
        # Signals are held across the fork: one arriving in between would otherwise run the
        # supervisor's inherited handler in the child and be lost there.
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
            raise
        if pid == 0:
            self.become_worker(index, slot, supervisor_pid, listeners)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        self.workers[pid] = WorkerProcess(index, self.generation, pid, slot, time.monotonic())
        LOGGER.info("worker %d started pid=%d generation=%d", index, pid, self.generation)

    def become_worker(self, index, slot, supervisor_pid, listeners):
        """In the forked child: drop the supervisor's signals, run a worker on ``listeners``
        (its TCP listening sockets), never return."""
        code = 1
        try:
            for handle in self.signal_handles:
                handle.cancel()
            # A terminal's Ctrl-C or hang-up reaches the whole process group: the supervisor
            # relays what it means, so the worker itself ignores INT and HUP.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the worker reopens logs
            for signum in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2):  # the
                signal.signal(signum, signal.SIG_IGN)  # supervisor's; they would stop or end it
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)  # TERM now: default exit
            listeners = self.bindings.for_worker(listeners)  # the rest closed here
            if self.admin is not None:
                self.admin.abandon()  # the admin endpoint is the supervisor's alone
            checked = self.monitor.state()
            self.monitor.abandon()  # so are the checks
            self.notifier.abandon()  # and speaking to systemd
            for channel in (self.upgrade_channel, self.upgrading and self.upgrading[1]):
                if channel:  # an upgrade's word is between the supervisors alone
                    channel.close()
            code = worker_process(self.config, index, self.worker_target(),
                                  self.heartbeats, slot, self.generation, listeners,
                                  supervisor_pid, self.control_dir, self.changes, checked)
        except BaseException:
            LOGGER.exception("worker %d failed", index)
        finally:
            os._exit(code)

    def announce_ready(self):
        """Log when every worker of the generation serves every route (again, after a
        replacement)."""
        if self.wanted_indexes():
            return
        current = self.current_workers()
        pids = frozenset(w.pid for w in current)
        if pids != self.announced and all(self.heartbeats.ready(w.slot) for w in current):
            self.announced = pids
            LOGGER.info("ready workers=%d generation=%d", len(current), self.generation)
            self.notifier.ready(self.status_line())
            if self.upgrade_channel is not None:
                gevent.spawn(self.confirm_upgrade)
            outgoing, self.outgoing = self.outgoing, []
            self.retire_generation([w for w in outgoing if w.pid in self.workers])

    def workers_healthy(self):
        """Whether every worker not retiring stamped its heartbeat lately (what systemd's
        watchdog pings vouch for, with the supervisor's loop that sends them)."""
        return all(self.heartbeats.age(w.slot) <= HEARTBEAT_LATE
                   for w in self.workers.values() if not w.retiring)

    def status_line(self):
        """One line for systemd's STATUS=: connections (as of the heartbeats), workers,
        generation, and the old generations still draining."""
        current = self.current_workers()
        connections = sum(self.heartbeats.connections(w.slot) for w in self.workers.values())
        line = (f"{connections} connections, {len(current)} workers, generation "
                f"{self.generation}")
        draining = [w for w in self.workers.values() if w.retiring]
        if draining:
            line += f", {len(draining)} draining"
        return line

    def reap_workers(self):
        """Collect exited workers; schedule replacements with backoff for young deaths."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                if self.upgrading is not None and pid == self.upgrading[0]:
                    LOGGER.info("new supervisor pid=%d exited (%s)", pid, describe_exit(
                        os.waitstatus_to_exitcode(wait_status)))
                    self.signals.put("UPGRADE_FAILED")  # unless it had taken over
                continue
            connections = self.heartbeats.connections(worker.slot)
            self.heartbeats.give_back(worker.slot)
            metrics.forget(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            how = describe_exit(code)
            if worker.retiring:
                LOGGER.info("worker %d pid=%d finished (%s)", worker.index, pid, how)
                continue
            LOGGER.warning("worker %d pid=%d died (%s) with %d connections (as of its last "
                           "heartbeat): their clients see them closed; restarting",
                           worker.index, pid, how, connections)
            if time.monotonic() - worker.started < YOUNG:
                deaths = self.deaths.get(worker.index, 0) + 1
                self.deaths[worker.index] = deaths
                delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN * 2 ** (deaths - 1))
                self.restart_after[worker.index] = time.monotonic() + delay
                if delay > HOLD_FOR_REPLACEMENT:
                    self.prune_slot_listeners(worker.index)
            else:
                self.deaths.pop(worker.index, None)

    def check_heartbeats(self):
        """Kill a worker that has not stamped its heartbeat for worker-timeout."""
        timeout = self.config.process.worker_timeout
        for worker in list(self.workers.values()):
            if worker.retiring:
                continue
            silent = self.heartbeats.age(worker.slot)
            if silent > timeout:
                LOGGER.error("worker %d pid=%d silent for %.1fs; killing it", worker.index,
                             worker.pid, silent)
                self.kill(worker.pid, signal.SIGKILL)
            elif self.heartbeats.draining(worker.slot):
                LOGGER.warning("worker %d pid=%d is draining on its own; replacing it",
                               worker.index, worker.pid)
                worker.retiring = True
                worker.kill_at = time.monotonic() + self.config.process.shutdown_timeout \
                    + KILL_GRACE

    def escalate(self):
        """Stop at once (QUIT) old workers past hard-stop-after; SIGKILL retiring workers that
        overran their deadline."""
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.hard_stop_at is not None and now >= worker.hard_stop_at:
                LOGGER.warning("worker %d pid=%d generation=%d still drains %d connections "
                               "after hard-stop-after; closing them", worker.index,
                               worker.pid, worker.generation,
                               self.heartbeats.connections(worker.slot))
                self.kill(worker.pid, signal.SIGQUIT)
                worker.hard_stop_at = None
                worker.kill_at = min(worker.kill_at or float("inf"), now + KILL_GRACE)
        for worker in self.workers.values():
            if worker.kill_at is not None and now >= worker.kill_at:
                LOGGER.warning("worker %d pid=%d overran its drain; killing it", worker.index,
                               worker.pid)
                self.kill(worker.pid, signal.SIGKILL)
                worker.kill_at = None

    @staticmethod
    def kill(pid, signum):
        """Send ``signum`` to ``pid``; a process already gone is fine."""
        try:
            os.kill(pid, signum)
        except OSError as error:
            if error.errno != errno.ESRCH:
                raise


