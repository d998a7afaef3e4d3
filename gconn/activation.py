"""Listening sockets handed to gconn at start (systemd's socket activation, sd_listen_fds(3)):
taking them from the environment, and which route each one serves.

``LISTEN_PID`` must be this process, ``LISTEN_FDS`` says how many descriptors from 3 on are
ours, ``LISTEN_FDNAMES`` (colon-separated) names them (``FileDescriptorName=`` in a .socket
unit, ``--fdname`` for systemd-socket-activate).  A route takes the socket named like the route,
else the one bound to the route's address.  Matching is pure (``match``); only
``inherited_sockets`` touches descriptors, and the supervisor owns what it returns.
"""

import dataclasses
import ipaddress
import logging
import os
import socket

from .settings import Address

LOGGER = logging.getLogger("gconn.activation")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first inherited descriptor
ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
UNNAMED = "unknown"  # systemd's name for a descriptor it was given no name for


@dataclasses.dataclass(frozen=True)
class Inherited:
    """One listening socket handed over at start: its name and the address it is bound to."""

    name: str
    address: Address
    socket: object = dataclasses.field(compare=False)


def socket_address(sock):
    """The Address a listening socket is bound to."""
    bound = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = bound.decode(errors="replace") if isinstance(bound, bytes) else bound
        return Address("unix", path=path)
    return Address("tcp", host=bound[0], port=bound[1])


def inherited_sockets(environ=os.environ, bound_only=lambda name: False):
    """The listening stream sockets handed to this process, taken out of the environment
    (so that no child sees them as its own); [] when there are none or they are another
    process's (``LISTEN_PID``).  Each descriptor is made close-on-exec; one that is not a
    listening stream socket (only bound, for a name ``bound_only`` accepts) is logged and
    closed."""
    values = {name: environ.pop(name, None) for name in ENVIRONMENT}
    if values["LISTEN_PID"] != str(os.getpid()) or not values["LISTEN_FDS"]:
        return []
    try:
        count = int(values["LISTEN_FDS"])
    except ValueError:
        LOGGER.warning("LISTEN_FDS=%r is not a number: no inherited sockets",
                       values["LISTEN_FDS"])
        return []
    names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    found = []
    for offset in range(count):
        descriptor = LISTEN_FDS_START + offset
        name = names[offset] if offset < len(names) and names[offset] else UNNAMED
        try:
            os.set_inheritable(descriptor, False)
            sock = socket.socket(fileno=descriptor)
        except OSError as error:
            LOGGER.warning("inherited descriptor %d (%s) is not a socket: %s", descriptor,
                           name, error.strerror)
            continue
        if sock.type != socket.SOCK_STREAM or not (
                bound_only(name) or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            LOGGER.warning("inherited descriptor %d (%s) is not a listening stream socket: "
                           "closed", descriptor, name)
            sock.close()
            continue
        found.append(Inherited(name, socket_address(sock), sock))
    return found


def same_address(bind, address):
    """Whether route address ``bind`` names the inherited socket's ``address`` (IP literals
    compared as addresses, so ``::ffff:127.0.0.1`` is not ``127.0.0.1`` but ``::1`` is
    ``0:0::1``; a host name never matches: name the socket instead)."""
    if bind.family != address.family:
        return False
    if bind.family == "unix":
        return os.path.abspath(bind.path) == os.path.abspath(address.path)
    if bind.port != address.port:
        return False
    try:
        return ipaddress.ip_address(bind.host or "0.0.0.0") == \
            ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return False


def match(routes, inherited):
    """{route name: Inherited} for ``routes`` (RouteConfigs): each route takes the socket
    named after it, else the first bound to its address; routes sharing a bind (by server
    name) share its socket.  Pure: no socket is touched."""
    by_name = {entry.name: entry for entry in inherited}
    taken = {}
    for route in routes:
        entry = by_name.get(route.name) or next(
            (entry for entry in inherited if same_address(route.bind, entry.address)), None)
        if entry is not None:
            taken[route.name] = entry
    return taken


def unmatched(routes, inherited):
    """The inherited sockets no route of ``routes`` takes (to be warned about)."""
    used = {id(entry) for entry in match(routes, inherited).values()}
    return [entry for entry in inherited if id(entry) not in used]
