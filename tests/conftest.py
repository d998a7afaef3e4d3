"""Shared fixtures: the daemon and echo backends as real subprocesses, loopback clients, and
small thread-based servers that tell which destination a client reached.

Tests wait for lines the processes print (``listening ...``, ``ready ...``), never for time.
"""

import hashlib
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time

import pytest
import trustme

LINE_TIMEOUT = 20.0  # seconds to wait for a process to print an expected line
CHUNK = 64 * 1024


class Process:
    """A gconn or gconn-echo subprocess whose stderr/stdout lines are collected as they come."""

    def __init__(self, args, env=None, cwd=None, preexec=None, pass_fds=()):
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=full_env, cwd=cwd, text=True, bufsize=1,
            start_new_session=True,  # own group: teardown reaches workers
            preexec_fn=preexec, pass_fds=pass_fds)
        self.lines = []
        self.finished = False  # the process closed its output
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.finished = True
            self._changed.notify_all()

    def mark(self):
        """The number of lines so far: pass as ``since`` to wait only for later lines."""
        return len(self.lines)

    def wait_line(self, predicate, timeout=LINE_TIMEOUT, since=0):
        """The first line from number ``since`` on (already seen or new) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        index = since
        with self._changed:
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    index += 1
                    if predicate(line):
                        return line
                if self.finished:
                    raise AssertionError(f"{self.args} exited ({self.popen.wait()}) first:\n" +
                                         "\n".join(self.lines[-40:]))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no expected line from {self.args}; got:\n" +
                                         "\n".join(self.lines[-40:]))
                self._changed.wait(remaining)

    def wait_contains(self, text, timeout=LINE_TIMEOUT, since=0):
        """The first line from number ``since`` on containing ``text``."""
        return self.wait_line(lambda line: text in line, timeout, since)

    def wait_exit(self, timeout=LINE_TIMEOUT):
        """Wait for the process to end and all its output to be read; return the exit code."""
        code = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self.popen.stdout.close()
        return code

    def signal(self, signum):
        self.popen.send_signal(signum)

    def stop(self):
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)
        self._reader.join(timeout=5)
        self.popen.stdout.close()


class Daemon(Process):
    """A running gconn daemon; ``address[route]`` is where each route really listens."""

    def __init__(self, args, env=None, cwd=None, wait=True, preexec=None):
        super().__init__(["-m", "gconn", *args], env=env, cwd=cwd, preexec=preexec)
        self.address = {}
        self.admin = None  # host:port of the admin endpoint, when it has one
        if wait:
            self.wait_ready()

    def wait_ready(self):
        self.wait_contains(" ready workers=")
        for line in self.lines:
            if "listening route=" in line:
                fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
                self.address[fields["route"]] = fields["address"]
            if "admin listening address=" in line:
                self.admin = line.split("address=", 1)[1].strip()
        return self

    def port(self, route="default"):
        return int(self.address[route].rsplit(":", 1)[1])

    def access_lines(self):
        return [line for line in self.lines if " end=" in line]


class Echo(Process):
    """A running gconn-echo backend listening on 127.0.0.1:<port>."""

    def __init__(self, host="127.0.0.1"):
        super().__init__(["-m", "gconn.echo", "--bind", f"{host}:0"])
        line = self.wait_contains("listening address=")
        self.address = line.split("address=", 1)[1].strip()
        self.port = int(self.address.rsplit(":", 1)[1])


@pytest.fixture
def processes():
    """Start processes through this list; every one is killed at the end of the test."""
    started = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def start_daemon(processes):
    """start_daemon(*args, env=..., config=TEXT) -> Daemon, killed after the test."""

    def start(*args, env=None, config=None, tmp=None, wait=True):
        args = list(args)
        if config is not None:
            path = os.path.join(tmp or os.getcwd(), "gconn-test.conf")
            with open(path, "w") as stream:
                stream.write(config)
            args = ["-c", path, *args]
        daemon = Daemon(["--access-log", "-", "--admin", "127.0.0.1:0", *args], env=env,
                        wait=False)
        processes.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    return start


@pytest.fixture
def start_echo(processes):
    """start_echo() -> Echo, killed after the test."""

    def start():
        echo = Echo()
        processes.append(echo)
        return echo

    return start


def connect(port, host="127.0.0.1", timeout=10.0):
    """A blocking client socket connected to host:port."""
    connection = socket.create_connection((host, port), timeout=timeout)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def echo_roundtrip(port, data, timeout=60.0):
    """Send ``data`` through host:port to an echo, half-close, return the SHA-256 received."""
    with connect(port, timeout=timeout) as connection:
        errors = []

        def send():
            try:
                view = memoryview(data)
                for offset in range(0, len(view), CHUNK):
                    connection.sendall(view[offset:offset + CHUNK])
                connection.shutdown(socket.SHUT_WR)
            except OSError as error:
                errors.append(error)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        digest = hashlib.sha256()
        received = 0
        while True:
            chunk = connection.recv(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        sender.join(timeout)
        assert not errors, errors
        return digest.hexdigest(), received


class AcceptLoop:
    """A loopback listener on 127.0.0.1 whose thread hands each accepted connection to
    ``accepted`` (a subclass's) until ``close``."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.accepted(connection)

    def accepted(self, connection):
        raise NotImplementedError

    def close(self):
        self.listener.close()


class TagServer:
    """A thread-based backend on ``host`` that sends its name on connect, then echoes; can be
    restarted."""

    def __init__(self, name, port=0, host="127.0.0.1"):
        self.name = name
        self.port = port
        self.host = host
        self.server = None
        self.start()

    def start(self):
        tag = self.name.encode() + b"\n"

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.sendall(tag)
                while True:
                    data = self.request.recv(CHUNK)
                    if not data:
                        break
                    self.request.sendall(data)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((self.host, self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tag_servers():
    """tag_servers(n) -> list of TagServer named d0, d1, ...; all stopped after the test."""
    made = []

    def make(count):
        servers = [TagServer(f"d{index}") for index in range(count)]
        made.extend(servers)
        return servers

    yield make
    for server in made:
        try:
            server.stop()
        except Exception:
            pass


def which_tag(port, timeout=10.0):
    """Connect through ``port`` and return the name the destination announces."""
    with connect(port, timeout=timeout) as connection:
        with connection.makefile("rb") as reader:
            return reader.readline().decode().strip()


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on (bound then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_gracefully(process, signum=signal.SIGTERM, timeout=30):
    """Send ``signum`` and return the exit code."""
    process.signal(signum)
    return process.wait_exit(timeout)


@pytest.fixture
def blackhole():
    """A loopback address whose SYNs go unanswered: a listener with a full accept queue."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(16):
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect(address)
        except TimeoutError:
            probe.close()
            break
        fillers.append(probe)
    else:
        pytest.fail("could not fill the accept queue: no blackhole to test with")
    yield f"{address[0]}:{address[1]}"
    for probe in fillers:
        probe.close()
    listener.close()


# TLS peers ------------------------------------------------------------------------------------

class TlsEcho(AcceptLoop):
    """A TLS server on 127.0.0.1 for ``names``: after the handshake it sends its tag line,
    then echoes every byte until the client half-closes."""

    def __init__(self, ca, tag, *names, client_ca=None):
        self.tag = tag
        self.handshakes = 0  # completed, for the health-check test
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(self.context)
        if client_ca is not None:  # require a client certificate from this CA
            client_ca.configure_trust(self.context)
            self.context.verify_mode = ssl.CERT_REQUIRED
        super().__init__()

    def accepted(self, client):
        threading.Thread(target=self.echo, args=(client,), daemon=True).start()

    def echo(self, client):
        try:
            with self.context.wrap_socket(client, server_side=True) as tls:
                self.handshakes += 1
                tls.sendall(self.tag.encode() + b"\n")
                while data := tls.recv(65536):
                    tls.sendall(data)
        except (OSError, ssl.SSLError):
            pass


@pytest.fixture
def ca():
    return trustme.CA()


@pytest.fixture
def tls_echo(ca):
    """tls_echo(tag, *names) -> a running TlsEcho, closed after the test."""
    started = []

    def start(tag, *names, client_ca=None):
        server = TlsEcho(ca, tag, *names, client_ca=client_ca)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def s_client_line(port, server_name, ca_file, line, *options):
    """Send ``line`` through ``openssl s_client`` to 127.0.0.1:port as ``server_name``,
    verifying against ``ca_file``; the line that comes back (s_client -quiet waits past the
    end of its input, so it is killed once the answer is read)."""
    client = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", server_name,
         "-quiet", "-verify_return_error", "-CAfile", str(ca_file), *options],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        client.stdin.write(line)
        client.stdin.flush()
        return client.stdout.readline()
    finally:
        client.kill()
        client.communicate()
