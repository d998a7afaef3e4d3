"""Destination state set at runtime (HAProxy's ``set server state drain|maint|ready`` and
``set server weight``), and blocked hosts lifted at once, as one worker applies them.

The supervisor keeps what was set (and the state file, if any) and sends each change to every
worker over its control socket (control.py); a worker it starts later, after a reload or a
restart, is handed all of it before it serves.  Here a change is applied to the worker's
routes: ``drain`` takes no new connection, live ones go on; ``maint`` takes none either and,
after ``grace`` seconds, ends the live connections to that destination (``end=maint``, from
each connection's own greenlet: it is killed with ``Maintenance``); ``ready`` serves again;
``weight`` replaces the configured weight.  ``read_state_file`` and ``write_state_file`` are
the supervisor's side: the changes kept in state-file across restarts.
"""

import json
import logging
import os

import gevent
from gevent import GreenletExit

STATES = ("ready", "drain", "maint")
LOGGER = logging.getLogger("gconn.runtime")


class Maintenance(GreenletExit):
    """Kills a session whose destination was put in maintenance (end reason ``maint``)."""

    END = "maint"  # the session's end reason


class UnknownTarget(ValueError):
    """A change that names no route or destination of this worker, or a bad value."""


def find(routes, route_name, destination_name):
    """(route, destination) of this worker by their names; UnknownTarget otherwise."""
    for route in routes:
        if route.name == route_name:
            for destination in route.destinations.destinations:
                if destination.name == destination_name:
                    return route, destination
            raise UnknownTarget(f"route {route_name} has no destination {destination_name}")
    raise UnknownTarget(f"no route {route_name}")


def apply(routes, registry, route_name, destination_name, state=None, weight=None, grace=0.0):
    """Apply one change in this worker; the destination's state and weight after it."""
    if state not in (None, *STATES):
        raise UnknownTarget(f"state must be one of {', '.join(STATES)}")
    route, destination = find(routes, route_name, destination_name)
    with route.destinations.lock.writing():
        destination.set_runtime(state, weight)
    if state == "maint":
        gevent.spawn_later(grace, end_maintained, registry, destination, destination.generation)
    LOGGER.info("route=%s destination %s: state=%s weight=%d", route_name, destination_name,
                destination.state, destination.base_weight)
    return {"state": destination.state, "weight": destination.base_weight}


def end_maintained(registry, destination, generation):
    """End the live sessions to ``destination`` in maintenance since ``generation`` (unless
    it was set again meanwhile)."""
    if destination.state == "maint" and destination.generation == generation:
        end_sessions(registry, destination, Maintenance)


def end_sessions(registry, destination, exception):
    """Kill the greenlets of the live sessions to ``destination`` with ``exception``."""
    for session in registry:
        if session.destination is destination and session.greenlet is not None:
            session.greenlet.kill(exception, block=False)


def apply_all(routes, registry, changes):
    """Apply every change the supervisor kept (a new worker, before it serves); changes for
    routes or destinations this config no longer has are skipped."""
    for (route_name, destination_name), change in changes.items():
        try:
            apply(routes, registry, route_name, destination_name, change.get("state"),
                  change.get("weight"))
        except UnknownTarget:
            continue


def unblock(routes, route_name, host):
    """Lift ``host``'s block on the route named ``route_name``; whether it was blocked."""
    for route in routes:
        if route.name == route_name:
            return route.blocker.unblock(host)
    raise UnknownTarget(f"no route {route_name}")


def read_state_file(path):
    """The runtime changes kept in ``path`` ({(route, destination): change}); nothing when
    there is no such file yet (or ``path`` is empty).  A file that is not gconn's state is
    ignored with a warning, never fatal."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as stream:
            entries = json.load(stream)
        return {(entry["route"], entry["destination"]):
                {key: entry[key] for key in ("state", "weight") if key in entry}
                for entry in entries}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as error:
        LOGGER.warning("state-file %s not read (%s): starting without runtime states", path,
                       error)
        return {}


def write_state_file(path, changes):
    """Keep ``changes`` in ``path`` (written to a temporary file, then renamed over it)."""
    if not path:
        return
    entries = [{"route": route, "destination": destination, **change}
               for (route, destination), change in sorted(changes.items())]
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as stream:
            json.dump(entries, stream, indent=1)
        os.replace(path + ".tmp", path)
    except OSError as error:
        LOGGER.error("state-file %s not written: %s", path, error.strerror)
