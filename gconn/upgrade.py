"""SIGUSR2's zero-downtime upgrade: the running supervisor starts its own program again (the code
installed now) and hands it every listening socket; the two agree over one socket pair.

The handover is socket activation (activation.py) spoken by gconn to itself: the new supervisor
gets the sockets as ``LISTEN_FDS`` from 3 on, each named in ``LISTEN_FDNAMES``: ``gconn-slot=``
a worker index's listening socket, ``gconn-reserve=`` a route's reserved address (the key
percent-encoded, as names cannot hold ``:``), ``gconn-admin`` the admin endpoint's; sockets
systemd gave the old supervisor keep their names.  ``GCONN_UPGRADE_FD`` is the new one's end of
the socket pair: it writes ``ready`` once its workers serve every route; the old one then
makes it systemd's main process (``MAINPID=``), answers ``main`` and drains its workers as a
reload does.  If the new one exits first, the old one never stopped serving.  This module
names and forks; the supervisor decides when.
"""

import fcntl
import os
import signal
import socket
import sys
import urllib.parse

SLOT = "gconn-slot="  # + quote("<bind>#<worker index>")
RESERVE = "gconn-reserve="  # + quote(<reservation key>)
ADMIN = "gconn-admin"
CHANNEL_ENV = "GCONN_UPGRADE_FD"  # the new supervisor's end of the socket pair
READY = b"ready\n"  # new -> old: every worker of mine serves every route
MAIN = b"main\n"  # old -> new: systemd now knows you as the main process; I am draining


def is_reservation(name):
    """Whether handed-over socket ``name`` is a reserved address (bound, not listening)."""
    return name.startswith(RESERVE)


def handover(slot_listeners, reservations, admin_socket, inherited):
    """[(name, socket)] of everything the new supervisor takes over: each worker index's
    listening sockets, the reserved addresses, the admin socket, and the sockets systemd
    handed over (under their own names)."""
    sockets = [(SLOT + urllib.parse.quote(f"{bind}#{index}", safe=""), listener)
               for (bind, index), listener in slot_listeners.items()]
    sockets += [(RESERVE + urllib.parse.quote(key, safe=""), holder)
                for key, holder in reservations.items()]
    if admin_socket is not None:
        sockets.append((ADMIN, admin_socket))
    sockets += [(entry.name, entry.socket) for entry in inherited]
    return sockets


def adopt(inherited):
    """Sort sockets taken at start (activation.Inherited) into (systemd's, {(bind, index):
    slot socket}, {reservation key: socket}, the admin socket or None)."""
    external, slots, reservations, admin = [], {}, {}, None
    for entry in inherited:
        if entry.name.startswith(SLOT):
            bind, _, index = urllib.parse.unquote(entry.name[len(SLOT):]).rpartition("#")
            slots[(bind, int(index))] = entry.socket
        elif entry.name.startswith(RESERVE):
            reservations[urllib.parse.unquote(entry.name[len(RESERVE):])] = entry.socket
        elif entry.name == ADMIN:
            admin = entry.socket
        else:
            external.append(entry)
    return external, slots, reservations, admin


def spawn(argv, sockets, environ, held_signals):
    """Fork and execute ``python -m gconn argv`` with ``sockets`` ([(name, socket)]) as its
    LISTEN_FDS and ``environ`` added; (pid, our end of the socket pair).  The child never
    returns: it execs or exits 127."""
    ours, theirs = socket.socketpair()
    signal.pthread_sigmask(signal.SIG_BLOCK, held_signals)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held_signals)
        ours.close()
        theirs.close()
        raise
    if pid == 0:  # the child: only async-signal-safe-minded work, then exec
        try:
            count = len(sockets)
            # above every target first, so that moving one to 3 + i overwrites nothing needed
            moved = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 3 + count + 1)
                     for _, sock in sockets]
            channel = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD, 3 + count + 1)
            for offset, descriptor in enumerate(moved):
                os.dup2(descriptor, 3 + offset)  # inheritable
            os.set_inheritable(channel, True)
            env = dict(os.environ, **environ, LISTEN_PID=str(os.getpid()),
                       LISTEN_FDS=str(count),
                       LISTEN_FDNAMES=":".join(name for name, _ in sockets))
            env[CHANNEL_ENV] = str(channel)
            if "WATCHDOG_USEC" in env:
                env["WATCHDOG_PID"] = str(os.getpid())
            for descriptor in moved:
                os.close(descriptor)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held_signals)
            os.execve(sys.executable, [sys.executable, "-m", "gconn", *argv], env)
        finally:
            os._exit(127)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, held_signals)
    theirs.close()
    return pid, ours


def channel_from_environment(environ=os.environ):
    """The new supervisor's end of the socket pair (taken out of the environment), or None
    when this gconn was not started by an upgrade."""
    value = environ.pop(CHANNEL_ENV, None)
    if not value:
        return None
    try:
        channel = socket.socket(fileno=int(value))
    except (ValueError, OSError):
        return None
    os.set_inheritable(channel.fileno(), False)
    return channel
