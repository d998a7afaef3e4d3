"""The daemon on real loopback sockets: strategies, failover, half-close, idle timeout, limits."""

import hashlib
import os
import socket
import socketserver
import threading
import time

import pytest
from conftest import connect, echo_roundtrip, free_port, which_tag


def destination_flags(servers):
    return [arg for s in servers for arg in ("--destination", f"127.0.0.1:{s.port}")]


def test_round_robin_rotates_and_a_stopped_destination_comes_back(tag_servers, start_daemon):
    """round-robin cycles d0,d1,d2; a stopped one is skipped and rejoins after retry-interval."""
    servers = tag_servers(3)
    daemon = start_daemon("--bind", "127.0.0.1:0", "--strategy", "round-robin", "--workers", "1",
                          "--retry-interval", "300ms", "--max-connect-errors", "0",
                          *destination_flags(servers))
    port = daemon.port()
    assert [which_tag(port) for _ in range(6)] == ["d0", "d1", "d2", "d0", "d1", "d2"]
    servers[1].stop()
    seen = [which_tag(port) for _ in range(6)]
    assert "d1" not in seen and set(seen) == {"d0", "d2"}
    servers[1].start()  # same port again
    deadline = time.monotonic() + 10
    while "d1" not in seen:
        assert time.monotonic() < deadline, "d1 never came back"
        seen.append(which_tag(port))


def test_weighted_round_robin_shares_connections_by_weight(tag_servers, start_daemon):
    """weight=3 and weight=1: of 40 connections through one worker exactly 30 and 10, spread
    out (d0 d0 d1 d0, period after period), not in bursts."""
    servers = tag_servers(2)
    daemon = start_daemon("--bind", "127.0.0.1:0", "--strategy", "round-robin", "--workers", "1",
                          "--destination", f"127.0.0.1:{servers[0].port} weight=3",
                          "--destination", f"127.0.0.1:{servers[1].port} weight=1")
    seen = [which_tag(daemon.port()) for _ in range(40)]
    assert seen.count("d0") == 30 and seen.count("d1") == 10
    assert seen[:8] == ["d0", "d0", "d1", "d0"] * 2


def test_source_hash_keeps_each_client_host_on_its_destination(tag_servers, start_daemon):
    """100 connections from one client host all reach one destination; eight hosts spread
    over more than one (two workers: the hash, not a per-worker turn, decides)."""
    from test_shedding import bound_client
    servers = tag_servers(3)
    daemon = start_daemon("--bind", "127.0.0.1:0", "--strategy", "source-hash", "--workers", "2",
                          *destination_flags(servers))

    def tag_from(source):
        with bound_client(source, daemon.port()) as client:
            with client.makefile("rb") as reader:
                return reader.readline().decode().strip()

    assert len({tag_from("127.0.0.2") for _ in range(100)}) == 1
    assert len({tag_from(f"127.0.0.{n}") for n in range(3, 11)}) > 1


def test_first_available_goes_back_to_the_head(tag_servers, start_daemon):
    """first-available serves from d0 always; while d0 is down, d1; then d0 again."""
    servers = tag_servers(3)
    daemon = start_daemon("--bind", "127.0.0.1:0", "--strategy", "first-available",
                          *destination_flags(servers))
    port = daemon.port()
    assert [which_tag(port) for _ in range(3)] == ["d0"] * 3
    servers[0].stop()
    assert [which_tag(port) for _ in range(3)] == ["d1"] * 3
    servers[0].start()
    assert which_tag(port) == "d0"


def test_failover_when_the_first_destination_refuses(start_echo, start_daemon):
    """A refused first destination: the client is served by the next one."""
    echo = start_echo()
    refused = f"127.0.0.1:{free_port()}"
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", refused,
                          "--destination", echo.address)
    data = os.urandom(100_000)
    assert echo_roundtrip(daemon.port(), data) == (hashlib.sha256(data).hexdigest(), len(data))
    line = daemon.wait_contains(" end=")
    assert f"destination={echo.address}" in line and "end=client_closed" in line


def test_failover_when_the_first_destination_blackholes(blackhole, start_echo, start_daemon):
    """A first destination that never answers: served by the next within connect-timeout."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--connect-timeout", "500ms",
                          "--destination", blackhole, "--destination", echo.address)
    started = time.monotonic()
    data = b"are you there?"
    assert echo_roundtrip(daemon.port(), data) == (hashlib.sha256(data).hexdigest(), len(data))
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 0.5 + 1.0, elapsed
    daemon.wait_contains("connect timed out")


def test_no_destination_up_closes_the_client_with_a_reason(start_daemon):
    """Every destination refusing: the client is closed and the access log says connect_failed."""
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{free_port()}")
    with connect(daemon.port()) as client:
        assert client.recv(10) == b""
    assert "end=connect_failed" in daemon.wait_contains(" end=")


class ScriptedServer:
    """A one-connection-at-a-time backend running ``script(connection)`` in a thread."""

    def __init__(self, script):
        outer = self
        self.done = threading.Event()
        self.results = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                outer.results.append(script(self.request))
                outer.done.set()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def read_all(connection):
    digest, total = hashlib.sha256(), 0
    while chunk := connection.recv(65536):
        digest.update(chunk)
        total += len(chunk)
    return digest.hexdigest(), total


def test_half_close_from_the_client(start_daemon):
    """The client shuts its write half; the destination still answers after reading it all."""

    def script(connection):
        digest, total = read_all(connection)  # ends at the client's end-of-stream
        connection.sendall(f"{digest} {total}".encode())

    server = ScriptedServer(script)
    try:
        daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", server.address)
        data = os.urandom(3 * 1024 * 1024)
        with connect(daemon.port()) as client:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            reply = b"".join(iter(lambda: client.recv(4096), b""))
        assert reply.decode() == f"{hashlib.sha256(data).hexdigest()} {len(data)}"
    finally:
        server.close()


def test_half_close_from_the_destination(start_daemon):
    """The destination shuts its write half first; the client's bytes still reach it."""
    greeting = os.urandom(1024 * 1024)

    def script(connection):
        connection.sendall(greeting)
        connection.shutdown(socket.SHUT_WR)
        return read_all(connection)

    server = ScriptedServer(script)
    try:
        daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", server.address)
        data = os.urandom(2 * 1024 * 1024)
        with connect(daemon.port()) as client:
            assert read_all(client) == (hashlib.sha256(greeting).hexdigest(), len(greeting))
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            assert client.recv(10) == b""
        assert server.done.wait(10)
        assert server.results == [(hashlib.sha256(data).hexdigest(), len(data))]
        assert "end=destination_closed" in daemon.wait_contains(" end=")
    finally:
        server.close()


def test_idle_timeout_closes_a_silent_connection_only(start_echo, start_daemon):
    """A silent connection is closed at idle-timeout (logged idle_timeout); a chatty one lives."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--idle-timeout", "600ms",
                          "--destination", echo.address)
    with connect(daemon.port()) as silent, connect(daemon.port()) as chatty:
        started = time.monotonic()
        for number in range(12):  # 1.2 s of traffic, one message every 100 ms
            message = b"ping %d" % number
            chatty.sendall(message)
            assert chatty.recv(100) == message
            time.sleep(0.1)  # pacing the traffic, not synchronising
        silent.settimeout(5)
        assert silent.recv(10) == b""
        assert 0.55 <= time.monotonic() - started
        chatty.sendall(b"still here")
        assert chatty.recv(100) == b"still here"
    assert "end=idle_timeout" in daemon.wait_contains("end=idle_timeout")


def test_max_connections_holds_the_next_client_until_one_leaves(start_echo, start_daemon):
    """With max-connections=2 the third client waits unserved, then is served when one leaves."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--max-connections", "2", "--workers", "1",
                          "--destination", echo.address)
    first, second = connect(daemon.port()), connect(daemon.port())
    for client in (first, second):
        client.sendall(b"hi")
        assert client.recv(10) == b"hi"
    third = connect(daemon.port())
    third.sendall(b"waiting")
    third.settimeout(0.5)
    with pytest.raises(TimeoutError):
        third.recv(10)  # not served while two are live
    first.close()
    third.settimeout(10)
    assert third.recv(10) == b"waiting"
    second.close()
    third.close()
