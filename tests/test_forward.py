"""Forwarding through the daemon preserves every byte and its order, at size and in number."""

import concurrent.futures
import hashlib
import os
import random

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
