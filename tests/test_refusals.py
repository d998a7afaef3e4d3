"""Refusals database clients understand, proved with the real clients (Debian's mariadb, psql,
redis-cli), and MySQL health checks that a real MariaDB does not count as failed handshakes."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
from conftest import connect, free_port

CLIENT_TIMEOUT = 30  # seconds a database client may take to be refused


def mariadb(port, *options, sql="select 1"):
    """Run Debian's mariadb client against 127.0.0.1:port: (exit code, stdout + stderr)."""
    result = subprocess.run(
        ["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{port}", "-uroot",
         "--connect-timeout=20", *options, "-e", sql],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    return result.returncode, result.stdout + result.stderr


def psql(port, *options):
    """Run psql against 127.0.0.1:port: (exit code, stdout + stderr)."""
    conninfo = " ".join(["host=127.0.0.1", f"port={port}", "user=app", "dbname=app",
                         "connect_timeout=20", *options])
    result = subprocess.run(["psql", "-X", conninfo, "-c", "select 1"], capture_output=True,
                            text=True, timeout=CLIENT_TIMEOUT, env={**os.environ,
                                                                   "PGPASSWORD": "x"})
    return result.returncode, result.stdout + result.stderr


def redis_cli(port, *command):
    """Run redis-cli against 127.0.0.1:port: (exit code, stdout + stderr)."""
    result = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *command],
                            capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def full_route(start_echo, start_daemon):
    """full_route(protocol, *args) -> a gconn route speaking ``protocol`` whose one slot a
    client holds until the test ends."""
    held = []

    def start(protocol, *args):
        daemon, client = start_full_route(start_echo, start_daemon, protocol, *args)
        held.append(client)
        return daemon

    yield start
    for client in held:
        client.close()


def start_full_route(start_echo, start_daemon, protocol, *args):
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--protocol", protocol, "--max-connections", "1",
                          "--max-queued", "0", "--bind", "127.0.0.1:0",
                          "--destination", echo.address, *args)
    held = connect(daemon.port())
    held.sendall(b"hold")
    assert held.recv(4) == b"hold"
    return daemon, held


def ended(daemon, end, count=1):
    """Wait for ``count`` access lines with ``end``; return the last."""
    return daemon.wait_line(lambda line: f" end={end} " in line
                            and sum(f" end={end} " in seen for seen in daemon.lines) >= count)


@pytest.mark.parametrize("options, shown", [
    (("--skip-ssl",), "ERROR 1040 (HY000): Too many connections to gconn route default"),
    ((), "The authenticity of the following error cannot be verified: 1040 - Too many "
         "connections to gconn route default"),
])
def test_mariadb_client_shown_too_many_connections(full_route, options, shown):
    """A mariadb client shed from a full mysql route prints error 1040 (with TLS on, as the
    unverifiable pre-TLS error it is), and the access line says queue_full."""
    daemon = full_route("mysql")
    code, output = mariadb(daemon.port(), *options)
    assert code == 1 and shown in output, output
    ended(daemon, "queue_full")


def test_mariadb_client_shown_queue_timeout_from_the_connection_greenlet(full_route):
    """A mariadb client that queued past queue-timeout gets the same 1040 from its own greenlet."""
    daemon = full_route("mysql", "--max-queued", "5",
                               "--queue-timeout", "100ms")
    code, output = mariadb(daemon.port(), "--skip-ssl")
    assert "ERROR 1040 (HY000): Too many connections to gconn route default" in output, output
    assert code == 1
    ended(daemon, "queue_timeout")


def test_mariadb_client_shown_no_destination_then_blocked_host(start_daemon):
    """With every destination failing, mariadb prints error 9001 naming the bind; after
    max-connect-errors such failures the host is blocked and it prints error 1129."""
    daemon = start_daemon("--workers", "1", "--protocol", "mysql", "--max-connect-errors", "2",
                          "--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{free_port()}")
    port = daemon.port()
    for count in (1, 2):
        code, output = mariadb(port, "--skip-ssl")
        assert code == 1, output
        assert (f"ERROR 9001 (HY000): Can't connect to remote MySQL server for client connected "
                f"to '127.0.0.1:{port}' (gconn route default: no destination available)"
                in output), output
        ended(daemon, "connect_failed", count)
    code, output = mariadb(port, "--skip-ssl")
    assert code == 1
    assert ("ERROR 1129 (HY000): Host '127.0.0.1' is blocked because of many connection "
            "errors (gconn route default)" in output), output
    ended(daemon, "blocked_host")


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
def test_psql_shown_too_many_clients(full_route, sslmode):
    """psql (answered N to its SSLRequest, or not asking) prints FATAL 53300's message from a
    full postgres route, refused in a greenlet of its own in the accept path."""
    daemon = full_route("postgres")
    code, output = psql(daemon.port(), f"sslmode={sslmode}")
    assert code == 2, output
    assert "FATAL:  sorry, too many clients already (gconn route default)" in output, output
    assert "closed the connection unexpectedly" not in output
    ended(daemon, "queue_full")


def test_psql_shown_queue_timeout_and_no_destination(full_route, start_daemon):
    """From its connection's greenlet: 53300 after queue-timeout; 08004's message when no
    destination answers."""
    daemon = full_route("postgres", "--max-queued", "5",
                              "--queue-timeout", "100ms")
    code, output = psql(daemon.port())
    assert code == 2 and "FATAL:  sorry, too many clients already" in output, output
    ended(daemon, "queue_timeout")
    dead = start_daemon("--workers", "1", "--protocol", "postgres", "--bind", "127.0.0.1:0",
                        "--destination", f"127.0.0.1:{free_port()}")
    code, output = psql(dead.port(), "sslmode=disable")
    assert code == 2
    assert "FATAL:  no destination available (gconn route default)" in output, output
    ended(dead, "connect_failed")


def test_postgres_refusal_reads_no_more_than_it_must(full_route):
    """A refused client that sends nothing, or an endless startup packet, is closed within
    the startup timeout; the SQLSTATE is in the ErrorResponse either way."""
    daemon = full_route("postgres")
    with connect(daemon.port()) as silent, connect(daemon.port()) as huge:
        huge.sendall((20000).to_bytes(4, "big") + (196608).to_bytes(4, "big"))  # over 10000
        began = time.monotonic()
        for client in (silent, huge):
            client.settimeout(10)
            reply = b""
            try:
                while chunk := client.recv(4096):
                    reply += chunk
            except ConnectionResetError:  # closed with the huge client's bytes unread
                assert client is huge
            assert reply[:1] == b"E" and b"C53300\x00" in reply, reply
    assert time.monotonic() - began < 5  # STARTUP_TIMEOUT is 2 s
    ended(daemon, "queue_full", 2)


def test_redis_cli_shown_max_clients(full_route, start_daemon):
    """redis-cli prints Redis's own "max number of clients reached" from a full redis route,
    and an -ERR naming the route when no destination answers."""
    daemon = full_route("redis")
    code, output = redis_cli(daemon.port(), "ping")
    assert "ERR max number of clients reached" in output, output
    ended(daemon, "queue_full")
    dead = start_daemon("--workers", "1", "--protocol", "redis", "--bind", "127.0.0.1:0",
                        "--destination", f"127.0.0.1:{free_port()}")
    code, output = redis_cli(dead.port(), "ping")
    assert "ERR no destination available (gconn route default)" in output, output
    ended(dead, "connect_failed")


def test_tcp_route_still_sends_the_shed_message(full_route):
    """protocol tcp (the default) keeps sending shed-message bytes to a shed client."""
    daemon = full_route("tcp", "--shed-message", "BUSY\\r\\n")
    with connect(daemon.port()) as client:
        client.settimeout(10)
        assert client.recv(100) == b"BUSY\r\n"


# a real MariaDB server, for the health checks ------------------------------------------------

class MariaDB:
    """A throwaway mariadbd on 127.0.0.1 in a temporary directory (root may log in without a
    password over the unix socket or TCP); host blocking works only with name resolution on."""

    def __init__(self, max_connect_errors):
        self.directory = tempfile.mkdtemp(prefix="gconn-mariadb-")
        self.socket = os.path.join(self.directory, "mysqld.sock")
        self.log = os.path.join(self.directory, "error.log")
        self.port = free_port()
        data = os.path.join(self.directory, "data")
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}",
                        "--user=root", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)
        self.process = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--user=root",
             f"--max-connect-errors={max_connect_errors}", "--performance-schema=ON",
             f"--pid-file={self.directory}/mysqld.pid", f"--log-error={self.log}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mariadbd did not start: {self.read_log()}")
            time.sleep(0.01)  # polling a log file: there is no event to wait on

    def read_log(self):
        try:
            with open(self.log, errors="replace") as stream:
                return stream.read()
        except FileNotFoundError:
            return ""

    def ready(self):
        return "ready for connections" in self.read_log()

    def sql(self, statement):
        """Run ``statement`` as root over the unix socket (not counted against any TCP host)."""
        return subprocess.run(["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot",
                               "-N", "-B", "-e", statement], capture_output=True, text=True,
                              check=True, timeout=CLIENT_TIMEOUT).stdout.strip()

    def status(self, name):
        return int(self.sql(f"SHOW GLOBAL STATUS LIKE '{name}'").split()[1])

    def stop(self):
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def mariadb_server():
    """mariadb_server(max_connect_errors) -> MariaDB, stopped after the test."""
    started = []

    def start(max_connect_errors=5):
        server = MariaDB(max_connect_errors)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def wait_for_connections(server, count, timeout=60):
    """Wait until the server has seen ``count`` more connections than now (its status)."""
    goal = server.status("Connections") + count
    deadline = time.monotonic() + timeout
    while server.status("Connections") < goal:
        assert time.monotonic() < deadline, "the health checks did not reach the server"
        time.sleep(0.05)  # the server's counter has no event to wait on


@pytest.mark.parametrize("user_exists", [True, False])
def test_mysql_checks_do_not_get_gconn_blocked_by_max_connect_errors(
        start_daemon, mariadb_server, user_exists):
    """50 health checks of a mysql route (source 127.0.0.2) leave a MariaDB with
    max_connect_errors=5 counting no handshake error, so clients still pass, whether the
    check user exists (a clean login and quit) or not (a polite access-denied)."""
    server = mariadb_server(max_connect_errors=5)
    if user_exists:
        server.sql("CREATE USER 'gconn_check'@'127.0.0.2'")
    server.sql("CREATE USER 'app'@'127.0.0.2'")
    daemon = start_daemon("--workers", "1", "--protocol", "mysql", "--source", "127.0.0.2",
                          "--check-interval", "10ms", "--bind", "127.0.0.1:0",
                          "--destination", f"127.0.0.1:{server.port}")
    wait_for_connections(server, 50)
    errors = server.sql("SELECT SUM_CONNECT_ERRORS, COUNT_HANDSHAKE_ERRORS FROM "
                        "performance_schema.host_cache WHERE IP = '127.0.0.2'")
    assert errors.split() == ["0", "0"], errors
    code, output = mariadb(daemon.port(), "--skip-ssl", "-uapp", sql="select 41 + 1")
    assert code == 0 and "42" in output, output
    assert ("Access denied for user 'gconn_check'" in server.read_log()) is not user_exists


def test_bare_tcp_checks_get_gconn_blocked_the_way_mysql_checks_avoid(start_daemon,
                                                                       mariadb_server):
    """The same checks as plain TCP connects (protocol tcp) get 127.0.0.2 blocked within a few
    checks: the MariaDB setup above can fail."""
    server = mariadb_server(max_connect_errors=5)
    server.sql("CREATE USER 'app'@'127.0.0.2'")
    daemon = start_daemon("--workers", "1", "--source", "127.0.0.2", "--check-interval", "10ms",
                          "--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{server.port}")
    wait_for_connections(server, 50)
    code, output = mariadb(daemon.port(), "--skip-ssl", "-uapp")
    assert code == 1 and "is blocked because of many connection errors" in output, output


def test_mysql_check_takes_down_a_server_that_refuses_in_its_greeting(start_daemon,
                                                                      mariadb_server):
    """A server whose greeting is an error (gconn's host blocked there) is marked down by
    the mysql checks, so clients get gconn's own refusal instead of the server's."""
    server = mariadb_server(max_connect_errors=1)
    blocked = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                       source_address=("127.0.0.2", 0))
    with blocked:
        blocked.recv(1024)  # the greeting; then an aborted handshake: 127.0.0.2 is blocked
    daemon = start_daemon("--workers", "1", "--protocol", "mysql", "--source", "127.0.0.2",
                          "--check-interval", "10ms", "--fall", "1",
                          "--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{server.port}")
    daemon.wait_contains(f"destination 127.0.0.1:{server.port} is down")
    code, output = mariadb(daemon.port(), "--skip-ssl")
    assert code == 1 and "(gconn route default: no destination available)" in output, output
