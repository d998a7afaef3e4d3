"""Checks that find the primary (issue 19, parts 1 and 2): ``check = send-expect`` against a
real Redis primary and replica swapped by REPLICAOF, with ``on-marked-down =
shutdown-sessions``; ``check = http`` against a small HTTP server standing in for Patroni;
checks run once per gconn whatever the workers; a destination's own check options;
``on-marked-up = shutdown-backup-sessions``."""

import http.server
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import AcceptLoop, TagServer, connect, free_port, which_tag
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


class CountingServer(AcceptLoop):
    """Accepts and closes at once, counting the connections (health checks) it saw."""

    def __init__(self):
        self.count = 0
        self.changed = threading.Condition()
        super().__init__()

    def accepted(self, connection):
        connection.close()
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def wait_count(self, count, timeout=30):
        with self.changed:
            assert self.changed.wait_for(lambda: self.count >= count, timeout), self.count

def status(daemon):
    with urllib.request.urlopen(f"http://{daemon.admin}/status", timeout=10) as response:
        return json.loads(response.read())


def test_checks_run_once_per_gconn_and_every_worker_sees_their_verdict(start_daemon):
    """Three workers, one checker: a destination is checked every check-interval, not three
    times as often; taken down, it is logged once and down in every worker at once."""
    server = CountingServer()
    daemon = start_daemon("--workers", "3", "--check-interval", "100ms", "--fall", "1",
                          "--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{server.port}")
    server.wait_count(1)
    began, first = time.monotonic(), server.count
    server.wait_count(first + 15)
    elapsed = time.monotonic() - began
    # 15 checks take about 1.5 s from one checker; three per-worker checkers take 0.5 s
    assert elapsed > 1.2, f"15 checks in {elapsed:.2f}s: more than one checker"
    routes = status(daemon)["routes"]["default"]
    assert routes["workers"] == 3
    assert routes["destinations"][f"127.0.0.1:{server.port}"]["up"] == 3
    mark = daemon.mark()
    server.close()
    daemon.wait_contains(f"destination 127.0.0.1:{server.port} is down", since=mark)
    entry = status(daemon)["routes"]["default"]["destinations"][f"127.0.0.1:{server.port}"]
    assert (entry["up"], entry["down"]) == (0, 3)  # published before the line was logged
    down_lines = [line for line in daemon.lines[mark:] if "is down" in line]
    assert len(down_lines) == 1, down_lines


def test_a_destination_overrides_the_route_check_or_opts_out(tag_servers, start_daemon):
    """check-port= on one destination probes that port (dead: the destination is down
    though its traffic port serves); check=no is never checked (always up)."""
    d0, d1 = tag_servers(2)
    dead, unchecked = free_port(), free_port()
    daemon = start_daemon(
        "--workers", "2", "--strategy", "round-robin", "--check-interval", "100ms",
        "--fall", "1", "--bind", "127.0.0.1:0",
        "--destination", f"127.0.0.1:{d0.port} check-port={dead}",
        "--destination", f"127.0.0.1:{d1.port}",
        "--destination", f"127.0.0.1:{unchecked} check=no")
    daemon.wait_contains(f"destination 127.0.0.1:{d0.port} is down")
    destinations = status(daemon)["routes"]["default"]["destinations"]
    assert destinations[f"127.0.0.1:{d0.port}"]["down"] == 2
    assert destinations[f"127.0.0.1:{d1.port}"]["up"] == 2
    assert destinations[f"127.0.0.1:{unchecked}"]["up"] == 2  # never checked
    assert {which_tag(daemon.port()) for _ in range(6)} == {"d1"}  # the unchecked one fails
    # a failed connection quarantines it in one worker, but the checks never take it down
    assert not any(line.endswith(f"127.0.0.1:{unchecked} is down") for line in daemon.lines)


@pytest.mark.parametrize("value", ["check=maybe", "check-port=0", "check-port=70000"])
def test_bad_destination_check_options_are_config_errors(value):
    result = subprocess.run(
        [sys.executable, "-m", "gconn", "--bind", "127.0.0.1:0",
         "--destination", f"127.0.0.1:1 {value}", "--check-config"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and value in result.stderr and "Traceback" not in \
        result.stderr, result.stderr


def test_on_marked_up_moves_clients_off_a_backup_when_the_primary_returns(start_daemon):
    """round-robin-with-fallback, on-marked-up = shutdown-backup-sessions: with the primary
    down a client lands on the backup; when the primary is up again that client is closed
    (end=primary_up) and new clients reach the primary."""
    primary, backup = TagServer("primary"), TagServer("backup")
    try:
        daemon = start_daemon(
            "--workers", "2", "--strategy", "round-robin-with-fallback",
            "--check-interval", "100ms", "--fall", "1", "--rise", "1",
            "--on-marked-up", "shutdown-backup-sessions", "--bind", "127.0.0.1:0",
            "--destination", f"127.0.0.1:{primary.port}",
            "--destination", f"127.0.0.1:{backup.port} backup")
        port = daemon.port()
        assert which_tag(port) == "primary"
        mark = daemon.mark()
        primary.stop()
        daemon.wait_contains(f"destination 127.0.0.1:{primary.port} is down", since=mark)
        held = connect(port)
        reader = held.makefile("rb")
        assert reader.readline() == b"backup\n"
        held.sendall(b"still here\n")
        assert reader.readline() == b"still here\n"
        mark = daemon.mark()
        primary.start()
        daemon.wait_contains(f"destination 127.0.0.1:{primary.port} is up", since=mark)
        assert reader.read() == b""  # closed: it can reconnect to the primary
        reader.close()
        held.close()
        line = daemon.wait_contains("end=primary_up", since=mark)
        assert f"destination=127.0.0.1:{backup.port}" in line
        assert {which_tag(port) for _ in range(4)} == {"primary"}
    finally:
        for server in (primary, backup):
            server.stop()


@pytest.mark.parametrize("changed", [False, True])
def test_a_reload_keeps_what_the_checks_found(tmp_path, tag_servers, start_daemon, changed):
    """A destination the checks took down stays down in the new generation from its first
    connection (its route's config unchanged or changed by the reload), no check needed."""
    (alive,) = tag_servers(1)
    dead = free_port()
    config = ("[route:default]\nbind = 127.0.0.1:0\nstrategy = round-robin\n"
              "check-interval = 300ms\nfall = 1\nrise = 3\n"
              f"destinations = 127.0.0.1:{dead}, 127.0.0.1:{alive.port}\n")
    daemon = start_daemon("--workers", "1", config=config, tmp=str(tmp_path))
    daemon.wait_contains(f"destination 127.0.0.1:{dead} is down")
    if changed:
        (tmp_path / "gconn-test.conf").write_text(config + "max-connections = 999\n")
    mark = daemon.mark()
    daemon.signal(signal.SIGHUP)
    daemon.wait_contains("ready workers=1 generation=1", since=mark)
    assert {which_tag(daemon.port()) for _ in range(6)} == {"d0"}
    assert not any("quarantined" in line or "connect_failed" in line
                   for line in daemon.lines[mark:])


def test_slow_start_share_of_a_returning_destination_grows_over_time(start_daemon):
    """slow-start 3 s, round-robin over two: d1 back up takes few new connections at first,
    more later, its full half after slow-start (its share measured per second since the
    checker brought it back)."""
    d0, d1 = TagServer("d0"), TagServer("d1")
    try:
        daemon = start_daemon(
            "--workers", "2", "--strategy", "round-robin", "--check-interval", "100ms",
            "--fall", "1", "--rise", "1", "--slow-start", "3s", "--max-connect-errors", "0",
            "--bind", "127.0.0.1:0",
            "--destination", f"127.0.0.1:{d0.port}", "--destination", f"127.0.0.1:{d1.port}")
        port = daemon.port()
        mark = daemon.mark()
        d1.stop()
        daemon.wait_contains(f"destination 127.0.0.1:{d1.port} is down", since=mark)
        mark = daemon.mark()
        d1.start()
        daemon.wait_contains(f"destination 127.0.0.1:{d1.port} is up", since=mark)
        began = time.monotonic()  # the workers had it before the line was written
        seconds = {0: [], 1: [], 2: [], 3: []}
        while (elapsed := time.monotonic() - began) < 4:
            seconds[int(elapsed)].append(which_tag(port))
        shares = [picks.count("d1") / len(picks) for picks in seconds.values()]
        assert all(len(picks) > 100 for picks in seconds.values()), \
            [len(picks) for picks in seconds.values()]
        assert shares[0] < 0.2 and shares[2] > shares[0] + 0.15 and shares[3] > 0.42, shares
    finally:
        for server in (d0, d1):
            server.stop()
