"""The workers as the admin endpoint sees them: every current worker is asked over its control
socket (control.py) and the answers are added up into readiness, per-route totals and one list
of live connections.

Nothing here forks, signals or reaps: the supervisor hands over a ``Roster`` (who is current,
who is still missing) and its heartbeat page, and the fleet only asks and adds up, on request,
never on the data path.
"""

import dataclasses
import time

from . import control

# the fields of a route's report that add up over the workers
ROUTE_COUNTS = ("greenlets", "pool_size", "accept_pauses", "active", "limit", "queued",
                "max_queued", "admitted", "blocked_hosts")


@dataclasses.dataclass(frozen=True)
class Roster:
    """The supervisor's workers at one moment, as far as the admin needs them."""

    generation: int
    stopping: bool
    current: tuple  # the current generation's workers that are not retiring (index, pid, slot)
    missing: tuple  # indexes of the current generation's workers that have no process yet
    draining: tuple = ()  # workers told to drain (older generations, removed ones, a stop)


def route_totals(reports):
    """Per-route totals over the workers' reports (None for a worker that did not answer):
    counts summed, per destination how many workers see it up or down, and the client hosts
    with the most live connections (each worker's top ones, summed)."""
    routes = {}
    for report in reports:
        if report is None:
            continue
        for name, route in report["routes"].items():
            total = routes.setdefault(name, {
                "address": route["address"], "workers": 0, **dict.fromkeys(ROUTE_COUNTS, 0),
                "shed": dict.fromkeys(route["shed"], 0), "top_hosts": {}, "destinations": {}})
            total["workers"] += 1
            for key in ROUTE_COUNTS:
                total[key] += route[key]
            for reason, count in route["shed"].items():
                total["shed"][reason] += count
            for host, live in route["top_hosts"]:
                total["top_hosts"][host] = total["top_hosts"].get(host, 0) + live
            for destination in route["destinations"]:
                entry = total["destinations"].setdefault(
                    destination["address"], {"up": 0, "down": 0, "active": 0,
                                             "state": destination.get("state", "ready"),
                                             "weight": destination.get("weight", 1)})
                entry["up" if destination["healthy"] else "down"] += 1
                entry["active"] += destination["active"]
    for total in routes.values():  # each worker's top hosts, added up: the top of those
        total["top_hosts"] = [{"host": host, "connections": live} for host, live in sorted(
            total["top_hosts"].items(), key=lambda item: -item[1])[:control.TOP_HOSTS]]
    return routes


def draining_generations(workers, heartbeats, now=None):
    """Per generation still draining, oldest first: its workers, their live connections as of
    their last heartbeats (nobody is asked: a draining worker may be busy), and the seconds
    until hard-stop-after closes them (None when it is off)."""
    now = time.monotonic() if now is None else now
    generations = {}
    for worker in workers:
        entry = generations.setdefault(worker.generation, {
            "generation": worker.generation, "workers": 0, "connections": 0,
            "hard_stop_in": None})
        entry["workers"] += 1
        entry["connections"] += heartbeats.connections(worker.slot)
        if worker.hard_stop_at is not None:
            left = round(max(0.0, worker.hard_stop_at - now), 1)
            entry["hard_stop_in"] = left if entry["hard_stop_in"] is None \
                else min(entry["hard_stop_in"], left)
    return [generations[generation] for generation in sorted(generations)]


class Fleet:
    """The supervisor's current workers, asked together; what the admin endpoint talks to."""

    def __init__(self, control_dir, roster, heartbeats):
        self.control_dir = control_dir  # where each worker's control socket is
        self.roster = roster  # returns the supervisor's Roster now
        self.heartbeats = heartbeats  # ready(slot): the worker listens on every route

    def ask(self, workers, command):
        """{pid: answer or None} from each of ``workers``, asked at once."""
        return control.ask_all(self.control_dir, [w.pid for w in workers], command)

    def readiness_problems(self):
        """Why gconn is not ready (empty when it is): every route must listen in every
        worker and have a destination to offer."""
        roster = self.roster()
        if roster.stopping:
            return ["stopping"]
        problems = [f"worker {index} not started" for index in roster.missing]
        problems += [f"worker {w.index} pid={w.pid} not listening yet" for w in roster.current
                     if not self.heartbeats.ready(w.slot)]
        if problems:
            return problems
        for pid, report in sorted(self.ask(roster.current, "report").items()):
            if report is None:
                problems.append(f"worker pid={pid} not answering")
                continue
            for name, route in report["routes"].items():
                if not route["listening"]:
                    problems.append(f"route {name}: not listening in worker pid={pid}")
                if not route["serving"]:
                    problems.append(f"route {name}: no healthy destination (worker pid={pid})")
        return problems

    def totals(self):
        """Per-route totals over the current workers, with destinations up/down (what
        ``/status`` serves and ``gconn status`` prints)."""
        roster = self.roster()
        reports = self.ask(roster.current, "report")
        return {"generation": roster.generation, "workers": len(reports),
                "workers_answering": sum(1 for report in reports.values() if report is not None),
                "routes": route_totals(reports.values()),
                "draining": draining_generations(roster.draining, self.heartbeats)}

    def connections(self, stacks=False):
        """Every live connection of every current worker; with ``stacks``, each with its
        greenlet's stack."""
        command = "connections stack" if stacks else "connections"
        found = []
        for answer in self.ask(self.roster().current, command).values():
            found.extend(answer or [])
        return found

    def flush_metrics(self):
        """Have every current worker publish the metrics it counted since its last heartbeat."""
        self.ask(self.roster().current, "flush")
