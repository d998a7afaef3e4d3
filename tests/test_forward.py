"""Forwarding through the daemon preserves every byte and its order, at size and in number."""

import concurrent.futures
import hashlib
import os
import random
import select
import socket
import threading

import pytest
from conftest import echo_roundtrip
from test_admin import scrape


@pytest.mark.timeout(180)
@pytest.mark.parametrize("splice", ["yes", "no"])
def test_100_megabytes_each_way_hash_equal(splice, start_echo, start_daemon):
    """100 MB of random bytes go through one connection and come back with the same SHA-256,
    spliced through a pipe (a bulk stream) and copied."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address,
                          "--splice", splice)
    data = os.urandom(100 * 1024 * 1024)
    digest, received = echo_roundtrip(daemon.port(), data, timeout=150)
    assert received == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    daemon.wait_contains(" end=")
    spliced = scrape(daemon)[("gconn_spliced_bytes_total", frozenset())]
    if splice == "yes":  # a bulk stream: most of its 200 MB moved through the pipes
        assert spliced > len(data), spliced
    else:
        assert spliced == 0


@pytest.mark.timeout(180)
def test_200_concurrent_connections_random_sizes(start_echo, start_daemon):
    """200 connections at once, 1 byte to 4 MB each, every one verified by hash."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address)
    rng = random.Random(2026)
    sizes = [1, 4 * 1024 * 1024] + [rng.randint(1, 4 * 1024 * 1024) for _ in range(198)]
    pool = os.urandom(4 * 1024 * 1024 + 4096)
    payloads = []
    for size in sizes:
        start = rng.randint(0, 4096)
        payloads.append(pool[start:start + size])
    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as executor:
        results = list(executor.map(lambda data: echo_roundtrip(daemon.port(), data), payloads))
    for data, (digest, received) in zip(payloads, results, strict=True):
        assert received == len(data)
        assert digest == hashlib.sha256(data).hexdigest()


def test_named_and_unix_destinations_forward_verified_bytes(tmp_path, start_echo,
                                                             start_daemon):
    """A destination given by name goes through the resolver and a connecting greenlet; one
    on a unix socket connects at once in the accept callback: both forward every byte, and
    so does a route listening on a unix socket."""
    echo = start_echo()
    by_name = start_daemon("--bind", "127.0.0.1:0", "--destination", f"localhost:{echo.port}")
    data = os.urandom(3 * 1024 * 1024)
    expected = (hashlib.sha256(data).hexdigest(), len(data))
    assert echo_roundtrip(by_name.port(), data) == expected
    assert f"destination=localhost:{echo.port}" in by_name.wait_contains(" end=")
    path = tmp_path / "gconn.sock"
    unix_front = start_daemon("--bind", f"unix:{path}", "--destination", echo.address)
    unix_front.wait_contains("listening route=")
    through_unix = start_daemon("--bind", "127.0.0.1:0", "--destination", f"unix:{path}")
    assert echo_roundtrip(through_unix.port(), data) == expected
    assert f"destination=unix:{path}" in through_unix.wait_contains(" end=")
    assert "end=client_closed" in unix_front.wait_contains(" end=")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("splice", ["yes", "no"])
def test_a_destination_that_stops_reading_holds_the_client_back(splice, start_daemon):
    """Backpressure: while the destination reads nothing, the client can only fill the socket
    buffers on the way (gconn keeps at most a chunk, or a pipe's worth, per direction); once it
    reads again, every byte arrives in order."""
    import psutil
    listener = socket.create_server(("127.0.0.1", 0))
    daemon = start_daemon("--bind", "127.0.0.1:0", "--splice", splice, "--destination",
                          f"127.0.0.1:{listener.getsockname()[1]}")
    workers = psutil.Process(daemon.popen.pid).children()
    rss_before = sum(worker.memory_info().rss for worker in workers)
    client = socket.create_connection(("127.0.0.1", daemon.port()))
    destination, _ = listener.accept()
    data = os.urandom(96 * 1024 * 1024)
    client.setblocking(False)
    sent = 0
    while sent < len(data):  # until the client cannot send for a whole second
        try:
            sent += client.send(memoryview(data)[sent:sent + 1024 * 1024])
        except BlockingIOError:
            if not select.select([], [client], [], 1.0)[1]:
                break
    assert 0 < sent < 48 * 1024 * 1024, sent  # held back by the kernel buffers, not gconn
    grown = sum(worker.memory_info().rss for worker in workers) - rss_before
    assert grown < 8 * 1024 * 1024, grown
    received = hashlib.sha256()
    count = 0

    def drain():
        nonlocal count
        while chunk := destination.recv(1024 * 1024):
            received.update(chunk)
            count += len(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    client.setblocking(True)
    client.sendall(memoryview(data)[sent:])
    client.shutdown(socket.SHUT_WR)
    reader.join(timeout=60)
    assert count == len(data) and received.hexdigest() == hashlib.sha256(data).hexdigest()
    client.close()
    destination.close()
    listener.close()
