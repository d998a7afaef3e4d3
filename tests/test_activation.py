"""Socket activation: routes served from listening sockets handed over in LISTEN_FDS (by
Debian's systemd-socket-activate, or by the test standing in for systemd), matched by name or
address; the port stays open while gconn restarts."""

import os
import shutil
import signal
import socket
import stat
import sys
import tempfile

from conftest import Daemon, Process, connect, free_port

from gconn.activation import Inherited, match, same_address, unmatched
from gconn.config import load

# run a program in place of this python (the launcher keeps the pid it was started with)
EXEC = "import os, sys; os.execvp(sys.argv[1], sys.argv[1:])"
# stand-in for systemd: move the descriptor in argv[1] to 3, say it is ours, run gconn
HANDOVER = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
            "LISTEN_FDNAMES=sys.argv[2]); "
            "os.execv(sys.executable, [sys.executable, '-m', 'gconn', *sys.argv[3:]])")
DAEMON_ARGS = ("--access-log", "-", "--admin", "127.0.0.1:0")


class Launched(Daemon):
    """gconn started through a launcher: ``args`` are the python arguments that run it."""

    def __init__(self, args, env=None, pass_fds=()):
        Process.__init__(self, args, env=env, pass_fds=pass_fds)
        self.address = {}
        self.admin = None


def start_activated(processes, *gconn_args, listen=(), names=""):
    """gconn under systemd-socket-activate, listening on each of ``listen`` (host:port)."""
    pythonpath = os.environ.get("PYTHONPATH", "")
    args = ["-c", EXEC, "systemd-socket-activate", "-E", f"PYTHONPATH={pythonpath}"]
    for address in listen:
        args += ["-l", address]
    if names:
        args.append(f"--fdname={names}")
    launched = Launched([*args, sys.executable, "-m", "gconn", *DAEMON_ARGS, *gconn_args])
    processes.append(launched)
    for address in listen:
        launched.wait_contains(f"Listening on {address}")
    return launched


def receive(client, size):
    """Exactly ``size`` bytes from ``client``."""
    received = b""
    while len(received) < size:
        chunk = client.recv(size - len(received))
        assert chunk, "closed before the echo came back"
        received += chunk
    return received


def echo_once(client, data=b"ping"):
    client.sendall(data)
    return receive(client, len(data))


def route(name, bind):
    config, _ = load(["--route-name", name, "--bind", bind, "--destination", "127.0.0.1:1"])
    return config.routes[0]


def test_match_by_name_then_by_address():
    """The socket named like the route wins; else one bound to the route's address (IP
    literals compared as addresses); a host name never matches; leftovers are reported."""
    front = Inherited("front", route("x", "127.0.0.1:7000").bind, socket=None)
    other = Inherited("unknown", route("x", "[::1]:7001").bind, socket=None)
    spare = Inherited("spare", route("x", "127.0.0.1:7002").bind, socket=None)
    routes = [route("front", "127.0.0.1:0"), route("b", "[0:0::1]:7001"),
              route("c", "localhost:7002"), route("d", "127.0.0.2:7000")]
    assert match(routes, [front, other, spare]) == {"front": front, "b": other}
    assert unmatched(routes, [front, other, spare]) == [spare]
    assert same_address(route("u", "unix:/run/gconn.sock").bind,
                        route("u", "unix:/run/../run/gconn.sock").bind)


def test_systemd_socket_activate_launches_gconn_on_the_first_client(processes, start_echo):
    """Under systemd-socket-activate the first client (which starts gconn) is served, and both
    workers serve the one inherited socket: gconn binds nothing of its own for the route."""
    echo = start_echo()
    address = f"127.0.0.1:{free_port()}"
    launched = start_activated(processes, "--workers", "2", "--bind", address,
                               "--destination", echo.address, listen=[address])
    port = int(address.rsplit(":", 1)[1])
    with connect(port) as first:  # accepted by the launcher's socket; it then runs gconn
        first.sendall(b"first")
        launched.wait_ready()
        assert receive(first, 5) == b"first"
    launched.wait_contains(f"route=default serves the inherited socket name=unknown "
                           f"address={address}")
    assert sum(f"listening route=default address={address}" in line
               for line in launched.lines) == 2
    for _ in range(8):
        with connect(port) as client:
            assert echo_once(client) == b"ping"
    with connect(port) as held:
        mark = launched.mark()
        launched.signal(signal.SIGHUP)  # the new generation serves the same socket
        launched.wait_contains("ready workers=2 generation=1", since=mark)
        for _ in range(2):  # both old workers let go of their copy of the socket
            mark = launched.lines.index(
                launched.wait_contains("refusing new connections", since=mark)) + 1
        assert echo_once(held) == b"ping"  # a connection of an old worker goes on
    with connect(port) as client:
        assert echo_once(client) == b"ping"


def test_named_socket_serves_its_route_and_an_unused_one_is_logged(processes, start_echo):
    """A socket named like a route serves it whatever the route's bind says; one that no route
    takes is logged; a route without a socket binds as usual."""
    echo = start_echo()
    front, spare = (f"127.0.0.1:{free_port()}" for _ in range(2))
    launched = start_activated(processes, "--workers", "1", "--route-name", "front", "--bind",
                               "127.0.0.1:0", "--destination", echo.address,
                               listen=[front, spare], names="front:spare")
    with connect(int(front.rsplit(":", 1)[1])) as client:
        launched.wait_ready()
        assert echo_once(client) == b"ping"
    launched.wait_contains(f"inherited socket name=spare address={spare} matches no route")
    assert launched.address["front"] == front


def test_port_stays_open_while_gconn_restarts(tmp_path, processes, start_echo):
    """The listening socket belongs to the launcher (here the test, as systemd): while gconn
    is stopped a client's connect is queued, not refused, and the next gconn serves it."""
    echo = start_echo()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(64)
    port = holder.getsockname()[1]
    args = ["--workers", "2", "--bind", f"127.0.0.1:{port}", "--destination", echo.address]

    def start():
        launched = Launched(["-c", HANDOVER, str(holder.fileno()), "gconn", *DAEMON_ARGS,
                             *args], pass_fds=(holder.fileno(),))
        processes.append(launched)
        return launched.wait_ready()

    try:
        first = start()
        first.wait_contains("serves the inherited socket name=gconn")
        with connect(port) as client:
            assert echo_once(client) == b"ping"
        first.signal(signal.SIGTERM)
        assert first.wait_exit() == 0
        with connect(port) as waiting:  # nobody serves: queued in the kept socket's backlog
            waiting.sendall(b"during")
            start()
            assert receive(waiting, 6) == b"during"
    finally:
        holder.close()


def test_inherited_unix_socket_is_served_and_its_path_left_alone(processes, start_echo):
    """A unix socket systemd made serves the route bound to its path; gconn never removes
    that path (it is systemd's), not even when it stops."""
    echo = start_echo()
    directory = tempfile.mkdtemp(prefix="gconn-activation-", dir="/tmp")
    path = os.path.join(directory, "front.sock")
    try:
        launched = start_activated(processes, "--workers", "2", "--bind", f"unix:{path}",
                                   "--destination", echo.address, listen=[path])
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            launched.wait_ready()
            assert echo_once(client) == b"ping"
        launched.wait_contains(f"serves the inherited socket name=unknown address=unix:{path}")
        launched.signal(signal.SIGTERM)
        assert launched.wait_exit() == 0
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
