"""SIGTERM/SIGINT: stop accepting, let live transfers finish within shutdown-timeout, exit 0."""

import hashlib
import json
import os
import signal
import socket
import threading
import time
import urllib.request

import pytest
from conftest import connect, stop_gracefully


def test_sigterm_mid_transfer_completes_refuses_new_and_exits_0(start_echo, start_daemon):
    """A transfer under way when SIGTERM arrives completes intact; new clients are refused."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    port = daemon.port()
    data = os.urandom(16 * 1024 * 1024)
    half = len(data) // 2
    client = connect(port, timeout=30)
    received = hashlib.sha256()
    count = 0
    client.sendall(data[:half])
    while count < half:  # the first half has made the round trip: the transfer is mid-way
        chunk = client.recv(65536)
        assert chunk
        received.update(chunk)
        count += len(chunk)
    mark = daemon.mark()
    daemon.signal(signal.SIGTERM)
    first = daemon.wait_contains("refusing new connections", since=mark)
    daemon.wait_contains("refusing new connections", since=daemon.lines.index(first) + 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    sender = threading.Thread(target=lambda: (client.sendall(data[half:]),
                                              client.shutdown(socket.SHUT_WR)))
    sender.start()
    while chunk := client.recv(65536):
        received.update(chunk)
        count += len(chunk)
    sender.join(10)
    client.close()
    assert (received.hexdigest(), count) == (hashlib.sha256(data).hexdigest(), len(data))
    assert daemon.wait_exit() == 0
    assert "end=client_closed" in daemon.wait_contains(" end=")


def test_shutdown_timeout_closes_what_is_left(start_echo, start_daemon):
    """A connection still live at shutdown-timeout is closed and logged end=shutdown; exit 0."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address,
                          "--shutdown-timeout", "300ms")
    with connect(daemon.port()) as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        assert stop_gracefully(daemon, signal.SIGINT) == 0
        assert client.recv(10) == b""
    assert "end=shutdown" in daemon.wait_contains(" end=")


def test_second_signal_stops_at_once(start_echo, start_daemon):
    """A second SIGTERM during the drain stops at once instead of waiting the full timeout."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address,
                          "--shutdown-timeout", "10m")
    with connect(daemon.port()) as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        daemon.signal(signal.SIGTERM)
        daemon.wait_contains("refusing new connections")
        assert stop_gracefully(daemon, signal.SIGTERM, timeout=20) == 0
    assert "end=shutdown" in daemon.wait_contains(" end=")


def test_shutdown_ends_sessions_still_connecting(blackhole, start_daemon):
    """Sessions stuck connecting to a blackhole end as shutdown when the drain runs out."""
    daemon = start_daemon("--workers", "1", "--connect-timeout", "60s",
                          "--shutdown-timeout", "500ms", "--bind", "127.0.0.1:0",
                          "--destination", blackhole)
    clients = [connect(daemon.port()) for _ in range(3)]
    try:
        deadline = time.monotonic() + 10
        while True:  # until all three are accepted and connecting
            with urllib.request.urlopen(f"http://{daemon.admin}/connections") as response:
                found = json.loads(response.read())["connections"]
            if [c["phase"] for c in found] == ["connecting"] * 3:
                break
            assert time.monotonic() < deadline, found
            time.sleep(0.05)  # polling the admin endpoint
        mark = daemon.mark()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=15) == 0
        ended = [line for line in daemon.lines[mark:] if "end=shutdown" in line]
        assert len(ended) == 3, daemon.lines[mark:]
        assert any("worker stopped" in line for line in daemon.lines[mark:])
        assert not any("overran" in line for line in daemon.lines[mark:])
    finally:
        for client in clients:
            client.close()
