"""Checks that find the primary (issue 19, parts 1 and 2): ``check = send-expect`` against a
real Redis primary and replica swapped by REPLICAOF, with ``on-marked-down =
shutdown-sessions``; ``check = http`` against a small HTTP server standing in for Patroni."""

import http.server
import subprocess
import sys
import threading

import pytest
from conftest import TagServer, connect, free_port, which_tag
from test_shedding import read_to_end


class Redis:
    """A redis-server on 127.0.0.1 (no persistence), asked with redis-cli."""

    def __init__(self, *args):
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        for line in self.process.stdout:
            if "Ready to accept connections" in line:
                break

    def cli(self, *args, port=None):
        return subprocess.run(["redis-cli", "-p", str(port or self.port), *args],
                              capture_output=True, text=True, timeout=30).stdout.strip()

    def stop(self):
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


@pytest.fixture
def redis_pair():
    primary = Redis()
    replica = Redis("--replicaof", "127.0.0.1", str(primary.port))
    yield primary, replica
    for server in (primary, replica):
        server.stop()


def role_through(port):
    """The role line of INFO replication, asked through gconn."""
    with connect(port) as client:
        client.sendall(b"INFO replication\r\n")
        answer = b""
        while b"role:" not in answer or b"\r\n" not in answer.split(b"role:", 1)[1]:
            answer += client.recv(4096)
    return answer.split(b"role:", 1)[1].split(b"\r\n", 1)[0].decode()


def test_send_expect_follows_a_redis_failover_and_cuts_the_old_primarys_sessions(
        redis_pair, start_daemon):
    """Only the primary passes ``INFO replication`` -> ``role:master``; after a swap new
    clients reach the new primary within the checks, and a client still on the old one is
    closed (end=destination_down) so that it reconnects."""
    primary, replica = redis_pair
    daemon = start_daemon(
        "--workers", "1", "--strategy", "first-available", "--check", "send-expect",
        "--check-send", r"INFO replication\r\n", "--check-expect", "role:master",
        "--check-interval", "100ms", "--fall", "1", "--rise", "1",
        "--on-marked-down", "shutdown-sessions", "--max-connect-errors", "0",
        "--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{primary.port}",
        "--destination", f"127.0.0.1:{replica.port}")
    port = daemon.port()
    daemon.wait_contains(f"destination 127.0.0.1:{replica.port} is down")
    assert role_through(port) == "master"
    held = connect(port)
    held.sendall(b"SET k before\r\n")
    assert held.recv(100) == b"+OK\r\n"
    mark = daemon.mark()
    assert replica.cli("REPLICAOF", "NO", "ONE") == "OK"
    assert primary.cli("REPLICAOF", "127.0.0.1", str(replica.port)) == "OK"
    daemon.wait_contains(f"destination 127.0.0.1:{primary.port} is down", since=mark)
    assert read_to_end(held) == b""  # closed: it can reconnect
    held.close()
    line = daemon.wait_contains("end=destination_down", since=mark)
    assert f"destination=127.0.0.1:{primary.port}" in line
    daemon.wait_contains(f"destination 127.0.0.1:{replica.port} is up", since=mark)
    assert role_through(port) == "master"
    result = subprocess.run(["redis-cli", "-p", str(port), "SET", "k", "after"],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "OK"  # a write: only a primary takes it
    assert replica.cli("GET", "k") == "after"


class Patroni:
    """An HTTP server on ``host``:``port`` standing in for Patroni's API: GET /primary
    answers ``status``."""

    def __init__(self, host, port=0):
        owner = self
        self.status = 200

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                self.send_response(owner.status if self.path == "/primary" else 404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_http_check_on_a_check_port_follows_the_primary(start_daemon):
    """check = http on check-port, each destination's own API: the one answering 200 on
    /primary takes the clients; when the APIs swap, the clients follow."""
    first = TagServer("127.0.0.2", host="127.0.0.2")
    second = TagServer("127.0.0.3", first.port, "127.0.0.3")
    api_first = Patroni("127.0.0.2")
    api_second = Patroni("127.0.0.3", api_first.port)
    api_second.status = 503
    try:
        daemon = start_daemon(
            "--workers", "1", "--strategy", "first-available", "--check", "http",
            "--check-path", "/primary", "--check-port", str(api_first.port),
            "--check-interval", "100ms", "--fall", "1", "--rise", "1",
            "--bind", "127.0.0.1:0", "--destination", f"127.0.0.2:{first.port}",
            "--destination", f"127.0.0.3:{first.port}")
        port = daemon.port()
        daemon.wait_contains(f"destination 127.0.0.3:{first.port} is down")
        assert {which_tag(port) for _ in range(4)} == {"127.0.0.2"}
        mark = daemon.mark()
        api_first.status, api_second.status = 503, 200
        daemon.wait_contains(f"destination 127.0.0.2:{first.port} is down", since=mark)
        daemon.wait_contains(f"destination 127.0.0.3:{first.port} is up", since=mark)
        assert {which_tag(port) for _ in range(4)} == {"127.0.0.3"}
    finally:
        for server in (api_first, api_second):
            server.close()
        for server in (first, second):
            server.stop()


def test_send_expect_needs_a_pattern():
    result = subprocess.run(
        [sys.executable, "-m", "gconn", "--check", "send-expect", "--bind", "127.0.0.1:0",
         "--destination", "127.0.0.1:1", "--check-config"], capture_output=True, text=True,
        timeout=30)
    assert result.returncode == 2 and "check-expect" in result.stderr
