"""systemd's notify protocol, spoken by the supervisor alone: READY, RELOADING, STOPPING,
STATUS, MAINPID and the watchdog, one datagram each to the socket named by ``NOTIFY_SOCKET``.

Nothing here decides when to notify (the supervisor does); this only reads the environment
once, owns the datagram socket and formats the messages (sd_notify(3)).  The protocol is a few
lines, so it is spoken here rather than through the sdnotify package: that one (last released
2017) has no abstract ``@`` socket names, no ``MONOTONIC_USEC``, no ``WATCHDOG_USEC`` and
hides every send error.  The variables are taken out of the environment at once, as
sd_notify's ``unset_environment`` does, so a forked worker or anything it runs can never
speak for gconn; systemd would refuse a worker's messages anyway (``NotifyAccess=main``).
"""

import logging
import os
import socket
import time

LOGGER = logging.getLogger("gconn.notify")

ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
MICROSECONDS = 1e-6  # seconds per microsecond (WATCHDOG_USEC, MONOTONIC_USEC)
# a watchdog ping every half of WatchdogSec, as sd_watchdog_enabled(3) advises
WATCHDOG_FRACTION = 0.5


def message(**fields):
    """The datagram for ``fields`` (``ready=1`` -> ``READY=1``), one ``KEY=value`` a line."""
    return "".join(f"{key.upper()}={value}\n" for key, value in fields.items()).encode()


def socket_address(name):
    """The address of ``NOTIFY_SOCKET`` ``name``: a path, or an abstract name for ``@...``."""
    if name.startswith("@"):
        return "\0" + name[1:]
    return name


def monotonic_usec():
    """CLOCK_MONOTONIC in microseconds (what RELOADING=1 carries as MONOTONIC_USEC)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """The supervisor's line to systemd; every method does nothing when not under systemd.

    Made from the environment (which it then clears): ``NOTIFY_SOCKET`` turns it on,
    ``WATCHDOG_USEC`` (for this pid, if ``WATCHDOG_PID`` says whose) turns the watchdog on.
    A failed send is logged once and otherwise ignored: gconn serves on whether or not
    systemd listens.
    """

    def __init__(self, environ=os.environ):
        values = {name: environ.pop(name, None) for name in ENVIRONMENT}
        self.socket_name = values["NOTIFY_SOCKET"]  # handed on by an upgrade (upgrade.py)
        self.address = socket_address(values["NOTIFY_SOCKET"]) \
            if values["NOTIFY_SOCKET"] else None
        self.socket = None
        if self.address is not None:
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec
        self.watchdog_interval = None  # seconds between pings; None: no watchdog
        self.watchdog_usec = None  # WATCHDOG_USEC as given, handed on by an upgrade
        usec, pid = values["WATCHDOG_USEC"], values["WATCHDOG_PID"]
        if self.socket is not None and usec and (not pid or pid == str(os.getpid())):
            try:
                self.watchdog_interval = int(usec) * MICROSECONDS * WATCHDOG_FRACTION
                self.watchdog_usec = usec
            except ValueError:
                LOGGER.warning("WATCHDOG_USEC=%r is not a number: no watchdog", usec)
        self.last_ping = float("-inf")
        self.last_status = None
        self.failed = False  # a send failed (logged once)
        self.said_stopping = False  # STOPPING=1 goes once
        self.muted = False  # not the main process (an upgrade's old or new one): say nothing

    @property
    def enabled(self):
        """Whether systemd listens (NOTIFY_SOCKET was set)."""
        return self.socket is not None

    def send(self, **fields):
        """Send one datagram of ``fields``; nothing when not under systemd."""
        if self.socket is None or self.muted:
            return
        try:
            self.socket.sendto(message(**fields), self.address)
        except OSError as error:
            if not self.failed:
                self.failed = True
                LOGGER.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"),
                               error.strerror or error)

    def ready(self, status=None):
        """Every worker listens: READY=1 (also the end of a reload)."""
        self.send(ready=1, **({"status": status} if status else {}))
        self.last_status = status or self.last_status

    def reloading(self):
        """A reload begins: RELOADING=1 with the monotonic time it began."""
        self.send(reloading=1, monotonic_usec=monotonic_usec())

    def stopping(self):
        """Draining for a stop has begun: STOPPING=1 (once)."""
        if not self.said_stopping:
            self.said_stopping = True
            self.send(stopping=1)

    def status(self, text):
        """STATUS=text, sent only when it changed."""
        if text != self.last_status and not self.muted:
            self.last_status = text
            self.send(status=text)

    def main_pid(self, pid):
        """MAINPID=pid: another process is now the service's main one."""
        self.send(mainpid=pid)

    def watchdog(self, healthy, now=None):
        """WATCHDOG=1 when the watchdog is on, ``healthy`` and the last ping is half of
        WatchdogSec old; an unhealthy gconn stays silent and systemd acts at WatchdogSec."""
        if self.watchdog_interval is None or not healthy:
            return
        now = time.monotonic() if now is None else now
        if now - self.last_ping >= self.watchdog_interval:
            self.last_ping = now
            self.send(watchdog=1)

    def watchdog_tick(self):
        """Seconds the supervisor's loop may wait before the next ping is due (inf: none)."""
        if self.watchdog_interval is None:
            return float("inf")
        return max(0.0, self.last_ping + self.watchdog_interval - time.monotonic())

    def mute(self, muted=True):
        """Say nothing more (or again, with ``muted=False``): systemd hears only its main
        process, which an upgrade moves from the old supervisor to the new one."""
        self.muted = muted

    def environment(self):
        """The variables that let an upgrade's new supervisor speak to systemd in turn
        (upgrade.py sets WATCHDOG_PID to the new process)."""
        if self.socket_name is None:
            return {}
        environ = {"NOTIFY_SOCKET": self.socket_name}
        if self.watchdog_usec is not None:
            environ["WATCHDOG_USEC"] = self.watchdog_usec
        return environ

    def abandon(self):
        """In a forked worker: close the copy of the socket (only the supervisor notifies)."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        self.watchdog_interval = None
