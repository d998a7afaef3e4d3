"""The supervisor's hold on the routes' addresses: reserved ports, each worker index's listening
sockets, and sockets handed over at start (systemd's, or an upgrading supervisor's).

Only the supervisor makes, keeps and closes these; a worker gets the ones it serves at fork
(``for_worker``) and closes the rest.  A reload's or a replacement's worker accepts from the
same socket as its predecessor (nginx's master keeps its reuseport sockets the same way), since
closing a socket of the SO_REUSEPORT group would reset what queued in it.  Which route an
inherited socket serves is activation.py's decision; what an upgrade hands on is upgrade.py's.
"""

import dataclasses
import logging
import os

from . import activation
from .sockets import keepalive_options, listen

LOGGER = logging.getLogger("gconn.bindings")


def reservation_key(route):
    """The key of a route's reserved address: port-0 routes each get a port of their own."""
    if route.bind.family == "tcp" and route.bind.port == 0:
        return f"{route.bind}#{route.name}"
    return str(route.bind)


class Bindings:
    """Every listening or reserved socket the supervisor holds for its routes."""

    def __init__(self, inherited=(), slot_listeners=None, reservations=None):
        # listening sockets handed over at start (activation.Inherited); kept until gconn
        # exits, so that every generation serves from them and gconn never closes the port
        self.inherited = list(inherited)
        self.activated = {}  # str(route bind) -> the inherited socket serving it
        # reservation_key(route) -> socket holding the route's address (a unix route's:
        # its one listening socket, shared by every worker)
        self.reservations = dict(reservations or {})
        # (str(bind), worker index) -> the listening socket that worker index accepts from
        # in every generation
        self.slot_listeners = dict(slot_listeners or {})

    def reserve(self, config):
        """Bind every TCP route address once (no listen) to learn port-0 ports and fail early
        on an address in use; return the config with every port fixed (and every route an
        inherited socket serves at that socket's address)."""
        config, activated = self.take_inherited(config)
        routes = []
        wanted = {reservation_key(route) for route in config.routes
                  if str(route.bind) not in activated}
        for key in [key for key in self.reservations if key not in wanted]:
            self.release(key)  # a route removed or moved by a reload
        for route in config.routes:
            if str(route.bind) in activated:
                pass
            elif route.bind.family == "tcp":
                key = reservation_key(route)
                holder = self.reservations.get(key)
                if holder is None:
                    holder = listen(route.bind, 1, reuse_port=True, listening=False)
                    self.reservations[key] = holder
                port = holder.getsockname()[1]
                route = dataclasses.replace(route, bind=dataclasses.replace(route.bind, port=port))
            elif str(route.bind) not in self.reservations:
                # one listening unix socket, made here and inherited by every worker
                self.reservations[str(route.bind)] = listen(route.bind, route.backlog)
            routes.append(route)
        self.activated = activated
        return dataclasses.replace(config, routes=tuple(routes))

    def take_inherited(self, config):
        """(``config`` with each route that an inherited socket serves bound to that socket's
        address, {str(address): socket} of those); an inherited socket no route takes is
        logged."""
        taken = activation.match(config.routes, self.inherited)
        for entry in activation.unmatched(config.routes, self.inherited):
            LOGGER.warning("inherited socket name=%s address=%s matches no route: unused",
                           entry.name, entry.address)
        routes, activated = [], {}
        for route in config.routes:
            entry = taken.get(route.name)
            if entry is not None:
                route = dataclasses.replace(route, bind=entry.address)
                LOGGER.info("route=%s serves the inherited socket name=%s address=%s",
                            route.name, entry.name, entry.address)
                activated[str(entry.address)] = entry.socket
            routes.append(route)
        return dataclasses.replace(config, routes=tuple(routes)), activated

    def release(self, key):
        """Close a reserved address (and remove a unix socket's file)."""
        holder = self.reservations.pop(key)
        holder.close()
        if key.startswith("unix:"):
            try:
                os.unlink(key[len("unix:"):])
            except OSError:
                pass

    def listeners_for(self, config, index):
        """Worker ``index``'s listening sockets (str(bind) -> socket) of ``config``'s routes
        but unix ones: made on first use, then kept across generations and replacements,
        their options and backlog brought to the current config; an inherited socket is every
        worker's.  StartupError when the OS refuses one."""
        listeners = {}
        for route in config.routes:
            name = str(route.bind)
            if name in listeners:  # shared by server name
                continue
            if name in self.activated:  # one socket for every worker (socket activation)
                listener = self.activated[name]
                if route.bind.family == "tcp":
                    for option in keepalive_options(route, switch_off=True):
                        listener.setsockopt(*option)
                listeners[name] = listener
                continue
            if route.bind.family != "tcp":
                continue
            key = (name, index)
            listener = self.slot_listeners.get(key)
            if listener is None:
                listener = listen(route.bind, route.backlog, reuse_port=True,
                                  options=keepalive_options(route))
                self.slot_listeners[key] = listener
            else:  # a reload may have changed them; accepted sockets inherit them
                for option in keepalive_options(route, switch_off=True):
                    listener.setsockopt(*option)
                listener.listen(route.backlog)
            listeners[name] = listener
        return listeners

    def prune(self, config, count, index=None):
        """Close the kept listening sockets no worker of ``config`` with ``count`` workers
        will take over (a route gone or moved, a worker index beyond them), or worker
        ``index``'s."""
        binds = {str(route.bind) for route in config.routes}
        for key in list(self.slot_listeners):
            name, number = key
            if name not in binds or name in self.activated or number >= count \
                    or number == index:
                self.slot_listeners.pop(key).close()

    def for_worker(self, listeners):
        """In a forked worker: ``listeners`` (from listeners_for) with the shared unix ones
        added; every other socket held here is closed in the worker."""
        listeners = dict(listeners)
        for key, holder in self.reservations.items():
            if key.startswith("unix:"):
                listeners[key] = holder  # the shared unix listener
            else:
                holder.close()  # the port reservation stays with the supervisor
        for listener in self.slot_listeners.values():  # the other workers' stay theirs
            if listener not in listeners.values():
                listener.close()
        for entry in self.inherited:  # an inherited socket no route serves
            if entry.socket not in listeners.values():
                entry.socket.close()
        return listeners

    def release_all(self):
        """Stopping: close every reserved address (removing unix files) and kept listener."""
        for key in list(self.reservations):
            self.release(key)
        for key in list(self.slot_listeners):
            self.slot_listeners.pop(key).close()

    def give_up(self):
        """After an upgrade: close this process's copies without removing any unix file (the
        new supervisor serves them)."""
        for holder in self.reservations.values():
            holder.close()
        self.reservations.clear()
        for listener in self.slot_listeners.values():
            listener.close()
        self.slot_listeners.clear()
