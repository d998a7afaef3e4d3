"""SIGTERM/SIGINT: fail /readyz and keep serving for shutdown-delay, then stop accepting, let
live transfers finish within shutdown-timeout, exit 0."""

import hashlib
import json
import os
import signal
import socket
import threading
import time
import urllib.error
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


def readyz(daemon):
    """(status, body) of the daemon's /readyz."""
    try:
        with urllib.request.urlopen(f"http://{daemon.admin}/readyz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def roundtrip(client, data):
    """Send ``data`` on ``client`` and read it all back from the echo behind gconn."""
    client.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = client.recv(65536)
        assert chunk, "closed mid-echo"
        received += chunk
    return received


def test_shutdown_delay_fails_readyz_but_serves_new_clients_then_drains(start_echo,
                                                                        start_daemon):
    """During shutdown-delay /readyz is 503 while a client connecting after the TERM is
    served; then new connects are refused and live connections drain to the end."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--bind", "127.0.0.1:0",
                          "--destination", echo.address, "--shutdown-delay", "4s")
    port = daemon.port()
    assert readyz(daemon)[0] == 200
    before = connect(port)
    assert roundtrip(before, b"before") == b"before"
    mark = daemon.mark()
    daemon.signal(signal.SIGTERM)
    termed = time.monotonic()
    daemon.wait_contains("still accepting for shutdown-delay", since=mark)
    assert readyz(daemon) == (503, "not ready\nstopping\n")
    during = connect(port)  # made after the TERM: still accepted and forwarded
    data = os.urandom(256 * 1024)
    assert roundtrip(during, data) == data
    assert time.monotonic() - termed < 4, "the checks above took longer than the delay"
    assert not any("refusing new connections" in line for line in daemon.lines[mark:])
    daemon.wait_contains("shutdown-delay over: draining", since=mark)
    first = daemon.wait_contains("refusing new connections", since=mark)
    daemon.wait_contains("refusing new connections", since=daemon.lines.index(first) + 1)
    assert time.monotonic() - termed >= 4
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    for client, tail in ((before, b"after"), (during, os.urandom(64 * 1024))):
        assert roundtrip(client, tail) == tail  # live ones still forward while draining
        client.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b""
        client.close()
    assert daemon.wait_exit() == 0
    ends = [line for line in daemon.lines[mark:] if " end=" in line]
    assert len(ends) == 2 and all("end=client_closed" in line for line in ends), ends


def test_second_term_skips_the_shutdown_delay(start_echo, start_daemon):
    """A second SIGTERM during a long shutdown-delay makes the workers drain at once."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address,
                          "--shutdown-delay", "10m")
    mark = daemon.mark()
    daemon.signal(signal.SIGTERM)
    daemon.wait_contains("still accepting for shutdown-delay", since=mark)
    assert readyz(daemon)[0] == 503
    with connect(daemon.port()) as client:
        assert roundtrip(client, b"still served") == b"still served"
    daemon.signal(signal.SIGTERM)
    daemon.wait_contains("skipping the rest of shutdown-delay", since=mark)
    daemon.wait_contains("refusing new connections", since=mark)
    assert daemon.wait_exit() == 0


def test_quit_skips_the_shutdown_delay(start_echo, start_daemon):
    """SIGQUIT during shutdown-delay stops at once, closing live connections."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address,
                          "--shutdown-delay", "10m", "--shutdown-timeout", "10m")
    with connect(daemon.port()) as client:
        assert roundtrip(client, b"x") == b"x"
        mark = daemon.mark()
        daemon.signal(signal.SIGTERM)
        daemon.wait_contains("still accepting for shutdown-delay", since=mark)
        assert stop_gracefully(daemon, signal.SIGQUIT, timeout=20) == 0
        assert client.recv(10) == b""
    assert "end=shutdown" in daemon.wait_contains(" end=", since=mark)
