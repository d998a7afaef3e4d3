"""``gconn-echo``: an echo backend for demos, tests and soak runs.

Sends back every byte it receives, in order; when the client shuts its write half, the echo
finishes sending and shuts its own (half-close aware).  Prints one ``listening address=...``
line per bind so that scripts can wait for it.

It is built on gconn's own low-cost primitives, because gconn-soak runs tens of thousands of
its connections beside gconn on the same cores and must cost far less than what it measures:
plain non-blocking OS sockets, one read watcher per connection whose callback receives into
one shared buffer and sends straight back, and a write watcher only while a client is slow to
read (then that client is not read: at most one chunk held per connection).

``--fault KIND@OFFSET[:ARGUMENT]`` (repeatable; for tests of the checkers) misbehaves on every
connection at that offset of its stream: ``flip@40`` sends byte 40 back inverted,
``drop@80:80`` swallows 80 bytes from offset 80, ``delay@80:2.5`` holds the bytes from offset 80
on for 2.5 seconds, ``reset@80`` resets the connection when the stream reaches offset 80.

Signals, for gconn-soak's fault injection: SIGUSR1 resets every live connection (a destination
that fails under its clients), SIGUSR2 stops reading every connection, new ones included, until
the next SIGUSR2 (a destination that stalls: its clients' bytes back up through gconn).
"""

from gevent import monkey

monkey.patch_all()  # before anything below imports socket

import _socket  # noqa: E402
import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.hub import get_hub  # noqa: E402

from .errors import StartupError  # noqa: E402
from .settings import parse_bind  # noqa: E402
from .sockets import RESOURCE_ERRORS, bound_address, listen, raise_open_files_limit  # noqa: E402

LOGGER = logging.getLogger("gconn.echo")
BUFFER = memoryview(bytearray(64 * 1024))  # every read lands here; nothing switches before
# the send of what was read
BACKLOG = 4096  # listen backlog, sized for soak bursts
ACCEPT_BATCH = 64  # connections accepted per readiness event
ACCEPT_PAUSE = 0.1  # seconds accepting pauses when the OS is out of descriptors
FAULT_KINDS = ("flip", "drop", "delay", "reset")
LIVE = set()  # every connection being echoed (what SIGUSR1 resets and SIGUSR2 stalls)
STALLED = [False]  # SIGUSR2's toggle: read nothing while set


def parse_fault(text):
    """``KIND@OFFSET[:ARGUMENT]`` -> (kind, offset, argument); ValueError says what is wrong."""
    kind, _, rest = text.partition("@")
    offset, _, argument = rest.partition(":")
    try:
        if kind not in FAULT_KINDS or not offset.isdigit():
            raise ValueError
        if kind == "drop":
            return kind, int(offset), int(argument or 1)
        if kind == "delay":
            return kind, int(offset), float(argument or 1.0)
        if argument:
            raise ValueError
        return kind, int(offset), None
    except ValueError:
        raise ValueError(f"{text!r}: expected flip@OFFSET, drop@OFFSET:COUNT, "
                         f"delay@OFFSET:SECONDS or reset@OFFSET") from None


class Echo:
    """One client connection, echoed from watcher callbacks in the hub (no greenlet)."""

    __slots__ = ("sock", "loop", "reader", "writer", "pending", "position", "faults", "timer")

    def __init__(self, sock, loop, faults):
        self.sock = sock
        self.loop = loop
        self.position = 0  # bytes of the client's stream read so far
        self.faults = faults
        self.pending = None  # bytes the client did not take yet
        self.writer = self.timer = None
        self.reader = loop.io(sock.fileno(), 1)
        if not STALLED[0]:
            self.reader.start(self.on_readable)
        LIVE.add(self)

    def on_readable(self):
        try:
            count = self.sock.recv_into(BUFFER)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not count:  # the client shut its write half: pass the end back, and finish
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.close()
            return
        start, data = self.position, BUFFER[:count]
        self.position += count
        if self.faults:
            data = self.misbehave(start, data)
            if data is None:
                return
        self.write(data)

    def write(self, data):
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):  # a slow reader: hold the rest, stop reading it until it is taken
            self.pending = bytes(data[sent:])
            self.reader.stop()
            if self.writer is None:
                self.writer = self.loop.io(self.sock.fileno(), 2)
            self.writer.start(self.on_writable)

    def on_writable(self):
        data, self.pending = self.pending, None
        self.writer.stop()
        if not STALLED[0]:
            self.reader.start(self.on_readable)
        self.write(data)

    def reset(self):
        """Close with a reset (SO_LINGER 0), as a destination that fails does."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def stall(self, stalled):
        """Stop reading (``stalled``) or read again, unless a write is pending anyway."""
        if self.reader is None or self.pending is not None or self.timer is not None:
            return
        if stalled:
            self.reader.stop()
        else:
            self.reader.start(self.on_readable)

    def misbehave(self, start, data):
        """Apply the faults whose offset falls in this chunk; the bytes to send, or None when
        nothing is to be sent now."""
        end = start + len(data)
        for kind, offset, argument in self.faults:
            if kind == "drop":
                low, high = max(start, offset), min(end, offset + argument)
                if low < high:
                    data = bytes(data[:low - start]) + bytes(data[high - start:])
                    start = end - len(data)  # what is left keeps its place at the end
                continue
            if not start <= offset < end:
                continue
            if kind == "flip":
                data = bytearray(data)
                data[offset - start] ^= 0xFF
            elif kind == "reset":
                self.reset()
                return None
            elif kind == "delay":
                held = bytes(data)
                self.reader.stop()
                self.timer = self.loop.timer(argument)
                self.timer.start(self.release, held)
                return None
        return data

    def release(self, held):
        self.timer.close()
        self.timer = None
        self.reader.start(self.on_readable)
        self.write(held)

    def close(self):
        for watcher in (self.reader, self.writer, self.timer):
            if watcher is not None:
                watcher.close()  # before the socket: the loop multiplexes watchers per fd
        self.reader = self.writer = self.timer = None
        self.sock.close()
        LIVE.discard(self)


def reset_all():
    """SIGUSR1: reset every live connection."""
    for echo in list(LIVE):
        echo.reset()


def toggle_stall():
    """SIGUSR2: stop reading every connection, or read again."""
    STALLED[0] = not STALLED[0]
    for echo in list(LIVE):
        echo.stall(STALLED[0])


class Acceptor:
    """Accepts on one listener from a watcher callback; each client becomes an Echo."""

    def __init__(self, listener, faults):
        self.listener = listener
        self.raw = getattr(listener, "_sock", listener)  # the OS socket under gevent's
        self.family = listener.family
        self.faults = faults
        self.loop = get_hub().loop
        self.watcher = self.loop.io(listener.fileno(), 1)
        self.pause = self.loop.timer(ACCEPT_PAUSE)
        self.watcher.start(self.on_readable)

    def on_readable(self):
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _ = self.raw._accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno not in RESOURCE_ERRORS:
                    raise
                LOGGER.warning("gconn-echo: pausing accepts: %s", error.strerror)
                self.watcher.stop()
                self.pause.start(self.watcher.start, self.on_readable)
                return
            sock = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
            if self.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            Echo(sock, self.loop, self.faults)

    def close(self):
        self.watcher.close()
        self.pause.close()
        self.listener.close()


def main(argv=None):
    """The ``gconn-echo`` command."""
    parser = argparse.ArgumentParser(prog="gconn-echo", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", action="append", required=True, metavar="HOST:PORT",
                        help="address to listen on (repeatable; port 0 picks a free one)")
    parser.add_argument("--fault", action="append", default=[], metavar="KIND@OFFSET[:ARG]",
                        help="misbehave on every connection, for tests: flip@N, drop@N:COUNT, "
                             "delay@N:SECONDS, reset@N (repeatable)")
    options = parser.parse_args(argv)
    try:
        faults = tuple(parse_fault(text) for text in options.fault)
    except ValueError as error:
        print(f"gconn-echo: --fault: {error}", file=sys.stderr)
        return 2
    raise_open_files_limit()
    acceptors = []
    try:
        for text in options.bind:
            try:
                address = parse_bind(text)
            except ValueError as error:
                print(f"gconn-echo: --bind {text!r}: {error}", file=sys.stderr)
                return 2
            listener = listen(address, BACKLOG)
            listener.setblocking(False)
            acceptors.append(Acceptor(listener, faults))
            print(f"listening address={bound_address(listener, address)}", flush=True)
    except StartupError as error:
        print(f"gconn-echo: {error}", file=sys.stderr)
        return 1
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    gevent.signal_handler(signal.SIGUSR1, reset_all)
    gevent.signal_handler(signal.SIGUSR2, toggle_stall)
    stop.wait()
    for acceptor in acceptors:
        acceptor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
