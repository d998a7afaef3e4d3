"""A worker's control socket: the supervisor's admin endpoint asks each worker what it has.

Each worker listens on ``<control dir>/<pid>.sock`` (a unix socket in a directory only the
supervisor's user can open) and answers one request per connection: a command line in, one
JSON document out.  ``report`` answers with the worker's report (pid, descriptors, memory, and
per route its counts and destinations), ``connections`` with its live connections
(``connections stack`` adds each one's greenlet stack), ``flush`` has it publish its metrics,
``set`` and ``unblock`` apply a runtime change (runtime.py), ``health {...}`` the checker's
published state (monitor.py).
Answers are built by walking the worker's registry and routes on request only, never on the
data path.  ``ask_one`` and ``ask_all`` are the supervisor's side (used by fleet.py): all
workers are asked at once, each within a timeout.
"""

import json
import logging
import os
import socket
import time

import gevent
from gevent.server import StreamServer

from . import metrics, runtime
from .sockets import process_usage

LOGGER = logging.getLogger("gconn.control")
REQUEST_LIMIT = 4 << 20  # bytes: a command line (the checker's state is the longest)
ANSWER_TIMEOUT = 2.0  # seconds the supervisor waits for one worker's answer
TOP_HOSTS = 10  # client hosts with the most live connections, per route, in a report


def socket_path(directory, pid):
    """Where worker ``pid`` listens for control requests."""
    return os.path.join(directory, f"{pid}.sock")


def route_report(route, now):
    """One route in this worker's report: listening, serving, counts, destinations."""
    admission = route.admission
    with route.destinations.lock.reading():
        slow_start = route.destinations.slow_start
        destinations = [{"address": d.name, "backup": d.backup, "weight": d.base_weight,
                         "state": d.state, "healthy": d.healthy,
                         "slow_start_share": round(min(1.0, (now - d.warm_since) / slow_start), 2)
                         if d in route.destinations.warming else None,
                         "available": d.available(now), "active": d.active,
                         "connected_total": d.connected_total, "failed_total": d.failed_total,
                         "last_error": d.last_error}
                        for d in route.destinations.destinations]
    return {"listening": route.owner.server.started, "address": route.address,
            "serving": route.destinations.has_candidates(now),
            "greenlets": len(route.pool), "pool_size": route.pool.size,
            "accept_pauses": route.accept_pauses,
            "active": admission.active, "limit": admission.limit,
            "queued": len(admission.waiting), "max_queued": admission.max_queued,
            "admitted": admission.admitted, "shed": dict(admission.shed),
            "blocked_hosts": route.blocker.blocked_hosts(now),
            "top_hosts": route.hosts.top(TOP_HOSTS), "destinations": destinations}


class ControlServer:
    """Answers the supervisor's questions about one worker."""

    def __init__(self, worker, directory, index, generation):
        self.worker = worker
        self.index = index
        self.generation = generation
        self.path = socket_path(directory, os.getpid())
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(64)
        self.server = StreamServer(listener, self.handle)

    def start(self):
        self.server.start()

    def stop(self):
        self.server.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def handle(self, connection, address):
        """One request: read the command line, write the JSON answer, close."""
        try:
            connection.settimeout(ANSWER_TIMEOUT)
            command = read_line(connection).decode("utf-8", "replace").strip()
            answer = self.answer(command)
            connection.sendall(json.dumps(answer).encode())
        except OSError as error:
            LOGGER.debug("control request failed: %s", error)
        finally:
            connection.close()

    def answer(self, command):
        """The JSON-ready answer to ``command``."""
        if command == "connections":
            return self.connections(stacks=False)
        if command == "connections stack":
            return self.connections(stacks=True)
        if command == "flush":
            metrics.flush(self.worker.routes)
            return {"pid": os.getpid()}
        if command == "report":
            return self.report()
        if command.startswith("health "):
            try:
                self.worker.published(json.loads(command[len("health "):]))
            except (ValueError, KeyError, TypeError) as error:
                return {"error": f"bad health state: {error}"}
            return {"pid": os.getpid()}
        words = command.split()
        try:
            if words[:1] == ["set"] and len(words) == 6:  # set ROUTE DEST STATE WEIGHT GRACE
                state, weight = (None if word == "-" else word for word in words[3:5])
                return runtime.apply(self.worker.routes, self.worker.registry, words[1],
                                     words[2], state, None if weight is None else int(weight),
                                     float(words[5]))
            if words[:1] == ["unblock"] and len(words) == 3:  # unblock ROUTE HOST
                return {"unblocked": runtime.unblock(self.worker.routes, words[1], words[2])}
        except (runtime.UnknownTarget, ValueError) as error:
            return {"error": str(error)}
        return {"error": f"unknown command {command!r}"}

    def connections(self, stacks):
        """Every live connection of this worker, each naming the worker's pid; with ``stacks``,
        each with its greenlet's stack."""
        pid = os.getpid()
        registry = self.worker.registry
        # snapshot() takes stacks= once the data-path rewrite lands; until then it is passed
        # only when stacks are asked for, so a plain listing works with either registry.
        connections = registry.snapshot(stacks=True) if stacks else registry.snapshot()
        for connection in connections:
            connection["worker"] = pid
        return connections

    def report(self):
        """This worker's report: who it is, what it uses, and every route's route_report."""
        now = time.monotonic()
        fds, fd_limit, resident = process_usage()
        return {"pid": os.getpid(), "index": self.index, "generation": self.generation,
                "draining": self.worker.stopping.is_set(), "live": len(self.worker.registry),
                "fds": fds, "fd_limit": fd_limit, "rss_bytes": resident,
                "routes": {route.name: route_report(route, now)
                           for route in self.worker.routes}}


def read_line(connection):
    """The request's first line (without its newline): what the first read brought, read on
    to the newline (or the peer's end, or REQUEST_LIMIT bytes) only for the checker's long
    ``health`` state, so that a command without a newline is answered at once."""
    data = connection.recv(65536)
    while data.startswith(b"health ") and b"\n" not in data and len(data) < REQUEST_LIMIT:
        chunk = connection.recv(min(65536, REQUEST_LIMIT - len(data)))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def ask_one(path, command):
    """Ask one worker; its decoded answer, or None if it did not answer in time."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(ANSWER_TIMEOUT)
        connection.connect(path)
        connection.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
        return json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return None
    finally:
        connection.close()


def ask_all(directory, pids, command):
    """Ask every worker in ``pids`` at once: {pid: answer or None}."""
    jobs = {pid: gevent.spawn(ask_one, socket_path(directory, pid), command) for pid in pids}
    gevent.joinall(list(jobs.values()), timeout=ANSWER_TIMEOUT + 1)
    return {pid: job.value if job.successful() else None for pid, job in jobs.items()}
