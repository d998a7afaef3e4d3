"""``gconn-echo``: an echo backend for demos, tests and soak runs.

Sends back every byte it receives, in order; when the client shuts its write half, the echo
finishes sending and shuts its own (half-close aware).  Prints one ``listening address=...``
line per bind so that scripts can wait for it.
"""

from gevent import monkey

monkey.patch_all()  # before anything below imports socket

import argparse  # noqa: E402
import functools  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from .errors import StartupError  # noqa: E402
from .settings import parse_bind  # noqa: E402
from .sockets import bound_address, listen, raise_open_files_limit  # noqa: E402

BUFFER = 64 * 1024  # bytes read at a time per connection
BACKLOG = 4096  # listen backlog, sized for soak bursts


def echo(connection, address, flip_at=None):
    """Echo one connection until the client ends; close it.  With ``flip_at`` (tests only)
    the byte at that stream offset is sent back inverted, to prove that checkers catch it."""
    position = 0
    try:
        while True:
            data = connection.recv(BUFFER)
            if flip_at is not None and position <= flip_at < position + len(data):
                index = flip_at - position
                data = data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1:]
            position += len(data)
            if not data:
                connection.shutdown(socket.SHUT_WR)  # pass the end of the stream back
                break
            connection.sendall(data)
    except OSError:
        pass
    finally:
        connection.close()


def main(argv=None):
    """The ``gconn-echo`` command."""
    parser = argparse.ArgumentParser(prog="gconn-echo", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", action="append", required=True, metavar="HOST:PORT",
                        help="address to listen on (repeatable; port 0 picks a free one)")
    parser.add_argument("--flip-byte-at", type=int, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    handler = echo
    if options.flip_byte_at is not None:
        handler = functools.partial(echo, flip_at=options.flip_byte_at)
    raise_open_files_limit()
    servers = []
    try:
        for text in options.bind:
            try:
                address = parse_bind(text)
            except ValueError as error:
                print(f"gconn-echo: --bind {text!r}: {error}", file=sys.stderr)
                return 2
            listener = listen(address, BACKLOG)
            server = StreamServer(listener, handler)
            server.start()
            servers.append(server)
            print(f"listening address={bound_address(listener, address)}", flush=True)
    except StartupError as error:
        print(f"gconn-echo: {error}", file=sys.stderr)
        return 1
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    stop.wait()
    for server in servers:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
