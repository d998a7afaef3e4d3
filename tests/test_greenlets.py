"""One greenlet per connection: the pool holds them, each sees its own context, the admin shows
them with their stacks, the error state reaches the access line, drain works through the pool,
the RWLock is safe between connection greenlets, and a busy stream starves nobody."""

import itertools
import json
import os
import re
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

import gevent
import pytest
from conftest import Daemon, connect, free_port
from gevent.event import Event
from test_admin import get

from gconn.destinations import RouteDestinations
from gconn.log import parse_fields as fields
from gconn.settings import parse_destinations

HELD = 60  # connections held open through gconn at once


def admin_json(daemon, path):
    """The JSON answer of GET ``path`` on the daemon's admin endpoint (which must say 200)."""
    status, body = get(daemon, path)
    assert status == 200, body
    return json.loads(body)


def client_port(sock):
    """``127.0.0.1:port`` of the client end of ``sock``, as gconn names it."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def test_each_connection_is_one_greenlet_in_the_pool_with_its_own_context(start_echo,
                                                                         start_daemon):
    """N held connections are N live greenlets in the route's pool with N distinct ids; each
    logs (from inside its greenlet) under its own connection id; ?stack=1 shows each one
    parked in the forwarding loop."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--log-level", "debug", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    clients = [connect(daemon.port()) for _ in range(HELD)]
    try:
        for number, client in enumerate(clients):
            client.sendall(b"%d" % number)
            assert client.recv(16) == b"%d" % number  # forwarding both ways
        totals = admin_json(daemon, "/status")["routes"]["default"]
        assert totals["greenlets"] == HELD and totals["active"] == HELD
        live = admin_json(daemon, "/connections?limit=1000&stack=1")["connections"]
        assert len(live) == HELD
        assert len({entry["greenlet"] for entry in live}) == HELD
        assert {entry["phase"] for entry in live} == {"forwarding"}
        for entry in live:
            assert any("gconn/forward.py" in frame and frame.endswith(" run")
                       for frame in entry["stack"]), entry["stack"]
            assert any(frame.endswith(" serve") for frame in entry["stack"])
        by_client = {entry["client"]: entry["id"] for entry in live}
        # each greenlet's own debug line: its conn= comes from local.current() in there
        logged = {}
        for line in daemon.lines:
            if " forwarding client=" in line:
                found = fields(line)
                logged[found["client"]] = found["conn"]
        assert {client_port(c): by_client[client_port(c)] for c in clients} == \
            {client_port(c): logged[client_port(c)] for c in clients}
        # a reset seen inside the forwarding loop is logged under that connection's id
        victim = clients.pop()
        victim_id = by_client[client_port(victim)]
        victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        victim.close()
        line = daemon.wait_contains(f"conn={victim_id} forwarding ends: client:")
        assert "Connection reset by peer" in line
        access = daemon.wait_contains(f"conn={victim_id} route=")
        assert fields(access)["error"] == "client: Connection reset by peer"
    finally:
        for client in clients:
            client.close()


def test_failover_that_fails_logs_every_error_in_the_access_line(start_daemon):
    """Two refused destinations: the access line ends connect_failed with both errors."""
    first, second = free_port(), free_port()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{first}",
                          "--destination", f"127.0.0.1:{second}", "--strategy",
                          "first-available", "--check-interval", "0")
    with connect(daemon.port()) as client:
        assert client.recv(100) == b""
    found = fields(daemon.wait_contains(" end=connect_failed"))
    assert found["error"] == (f"127.0.0.1:{first}: Connection refused; "
                              f"127.0.0.1:{second}: Connection refused")


def test_a_clean_close_has_no_error_field(start_echo, start_daemon):
    """A connection both sides closed normally is logged without an error field, even when it
    got its destination by failing over past a refused one."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--strategy", "first-available",
                          "--check-interval", "0", "--destination", f"127.0.0.1:{free_port()}",
                          "--destination", echo.address)
    with connect(daemon.port()) as client:
        client.sendall(b"hello")
        assert client.recv(5) == b"hello"
        client.shutdown(socket.SHUT_WR)
        assert client.recv(5) == b""
    line = daemon.wait_contains(" end=client_closed")
    assert "error=" not in line


def test_drain_through_the_pool_then_a_second_term_kills_it(start_echo, start_daemon):
    """SIGTERM: clients that close finish normally, the rest stay in phase draining; a second
    SIGTERM kills the pool at once (end=shutdown with its error); no descriptor is left open."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--shutdown-timeout", "60s", "--bind",
                          "127.0.0.1:0", "--destination", echo.address)
    worker = re.search(r"gconn\[(\d+)\]", daemon.wait_contains("worker serving")).group(1)
    sockets_when_ready = sum(os.readlink(f"/proc/{worker}/fd/{fd}").startswith("socket:")
                             for fd in os.listdir(f"/proc/{worker}/fd"))
    clients = [connect(daemon.port()) for _ in range(20)]
    for client in clients:
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"
    mark = daemon.mark()
    daemon.signal(signal.SIGTERM)
    daemon.wait_contains("draining 20 live", since=mark)
    for client in clients[:10]:
        client.close()
    for _ in range(10):
        mark = daemon.lines.index(daemon.wait_contains(" end=client_closed", since=mark)) + 1
    for client in clients[10:]:  # still forwarded while the worker drains
        client.sendall(b"pong")
        assert client.recv(4) == b"pong"
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    stopped = fields(daemon.wait_contains("worker stopped"))
    assert time.monotonic() - began < 5.0
    cut = [line for line in daemon.lines if " end=shutdown" in line]
    assert len(cut) == 10
    assert all(fields(line)["error"] == "cut in phase draining by shutdown" for line in cut)
    for client in clients[10:]:
        assert client.recv(4) == b""  # each one was closed, not left hanging
        client.close()
    assert stopped["live"] == "0"
    # the sockets the worker holds at the end: those it held when ready, less its listener
    assert int(stopped["sockets"]) == sockets_when_ready - 1
    assert daemon.wait_exit() == 0


def test_rwlock_between_a_writer_and_a_thousand_connection_greenlets():
    """1,000 greenlets pick destinations while a health-check writer holds the route's lock:
    none raises, none is lost, all get their candidates once the writer lets go."""
    destinations = RouteDestinations(parse_destinations("127.0.0.1:1, 127.0.0.1:2"),
                                     "round-robin")
    writer_holds, release = Event(), Event()

    def writer():
        with destinations.lock.writing():
            writer_holds.set()
            release.wait()

    def reader():
        return [destination.name for destination in destinations.candidates(0.0)]

    holding = gevent.spawn(writer)
    writer_holds.wait()
    readers = [gevent.spawn(reader) for _ in range(1000)]
    gevent.sleep(0)  # every reader starts and queues behind the writer
    assert not any(greenlet.ready() for greenlet in readers)
    release.set()
    gevent.joinall([holding, *readers], raise_error=True, timeout=10)
    assert all(greenlet.successful() for greenlet in readers)
    assert sorted(len(greenlet.value) for greenlet in readers) == [2] * 1000
    assert destinations.turn == 1000


@pytest.mark.timeout(120)
def test_at_descriptor_capacity_accepting_resumes_when_a_connection_ends(start_echo,
                                                                          processes):
    """A worker full of connections leaves new clients in the listen backlog without polling
    (its pause count stays put over a second), takes one more as a connection ends, and every
    waiting client is served in the end with its bytes intact."""
    echo = start_echo()
    limit = 100  # open files: (100 - 64 reserved) / 2 = 18 forwarded connections fit

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    daemon = Daemon(["--workers", "1", "--access-log", "-", "--admin", "127.0.0.1:0",
                     "--bind", "127.0.0.1:0", "--destination", echo.address],
                    preexec=low_limit)
    processes.append(daemon)
    port = daemon.port()
    held = [connect(port) for _ in range(18)]
    for client in held:
        client.sendall(b"held")
        assert client.recv(4) == b"held"
    waiting = [connect(port) for _ in range(5)]  # accepted by the kernel: in the backlog
    for number, client in enumerate(waiting):
        client.sendall(b"waiting %d" % number)
    daemon.wait_contains("pausing accepts")

    def pauses():
        return admin_json(daemon, "/status")["routes"]["default"]["accept_pauses"]

    paused = pauses()
    time.sleep(1.0)  # a measuring window: a polling timer would retry (and pause) meanwhile
    assert pauses() == paused
    held.pop().close()
    assert waiting[0].recv(16) == b"waiting 0"  # served as soon as the slot's owner left
    assert admin_json(daemon, "/status")["routes"]["default"]["greenlets"] == 18
    for client in held:
        client.close()
    for number, client in enumerate(waiting):
        if number:
            assert client.recv(16) == b"waiting %d" % number
        client.close()
    # each episode is logged once: pauses and resumptions alternate (as the held connections
    # end, the waiting ones may fill the worker again: a second episode)
    episodes = ["pause" if "pausing accepts" in line else "again" for line in daemon.lines
                if "pausing accepts" in line or "accepting again" in line]
    assert episodes[:1] == ["pause"]
    assert all(first != second for first, second in itertools.pairwise(episodes)), episodes


def round_trips(port, count):
    """Seconds each of ``count`` small request/response round trips took on one connection."""
    times = []
    with connect(port) as client:
        for number in range(count):
            message = b"%08d" % number
            began = time.perf_counter()
            client.sendall(message)
            received = b""
            while len(received) < len(message):
                received += client.recv(64)
            times.append(time.perf_counter() - began)
            assert received == message
    return times


def p99_of_small_connections(port, connections=4, count=400):
    """p99 round-trip time over several concurrent small request/response connections."""
    results = []
    threads = [threading.Thread(target=lambda: results.extend(round_trips(port, count)))
               for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == connections * count
    return statistics.quantiles(results, n=100)[98]


BULK = """
import hashlib, json, os, socket, sys, threading
sink = socket.create_server(("127.0.0.1", 0))
print(sink.getsockname()[1], flush=True)
chunk, sent, received = os.urandom(1 << 20), hashlib.sha256(), hashlib.sha256()
buffer = memoryview(bytearray(4 << 20))
counts = {"sent": 0, "received": 0}
def drain():
    connection, _ = sink.accept()
    while size := connection.recv_into(buffer):
        received.update(buffer[:size])
        counts["received"] += size
        if counts["received"] >= 64 << 20 and not flowing.is_set():
            flowing.set()
            print("flowing", flush=True)
    connection.close()
flowing, sink_thread = threading.Event(), threading.Thread(target=drain)
sink_thread.start()
client = socket.create_connection(("127.0.0.1", int(sys.stdin.readline())))
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
while not stop.is_set():
    client.sendall(chunk)
    sent.update(chunk)
    counts["sent"] += len(chunk)
client.shutdown(socket.SHUT_WR)
sink_thread.join()
client.close()
print(json.dumps({**counts, "hashes_equal": sent.digest() == received.digest()}), flush=True)
"""


def start_bulk():
    """A process of its own (nice 19) that will stream to the port it is given on stdin and
    sink what reaches its own listener; returns (process, its sink's port)."""
    process = subprocess.Popen([sys.executable, "-c", BULK], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(19))
    return process, int(process.stdout.readline())


def p99_beside_stream(bulk, target, small_port):
    """Median p99 of the small connections while ``bulk`` streams to ``target``; the
    stream's bytes must arrive whole."""
    bulk.stdin.write(f"{target}\n")
    bulk.stdin.flush()
    assert bulk.stdout.readline() == "flowing\n"  # 64 MB moved: the stream is at full speed
    p99 = statistics.median(p99_of_small_connections(small_port) for _ in range(7))
    bulk.stdin.write("stop\n")
    bulk.stdin.flush()
    stream = json.loads(bulk.stdout.readline())
    assert bulk.wait(60) == 0
    assert stream["hashes_equal"] and stream["sent"] == stream["received"] > 64 << 20
    return p99


def quiet_and_busy_p99(echo, processes, config):
    """(p99 with the stream beside gconn, p99 with it through gconn's worker), from a gconn
    of its own pinned to core 0 (this process and its children are on core 1)."""
    bulks = []
    try:
        through, through_sink = start_bulk()
        beside, beside_sink = start_bulk()
        bulks += [through, beside]
        config.write_text(f"[gconn]\nworkers = 1\n[route:default]\nbind = 127.0.0.1:0\n"
                          f"destinations = {echo.address}\n[route:bulk]\nbind = 127.0.0.1:0\n"
                          f"destinations = 127.0.0.1:{through_sink}\n")
        daemon = Daemon(["-c", str(config), "--access-log", "off", "--admin", ""],
                        preexec=lambda: os.sched_setaffinity(0, {0}))
        processes.append(daemon)
        port = daemon.port("default")
        p99_of_small_connections(port, count=50)  # warm-up
        quiet = p99_beside_stream(beside, beside_sink, port)
        busy = p99_beside_stream(through, daemon.port("bulk"), port)
        daemon.stop()
        return quiet, busy
    finally:
        for bulk in bulks:
            bulk.kill()
            bulk.wait()
            bulk.stdin.close()
            bulk.stdout.close()


@pytest.mark.timeout(240)
def test_a_saturating_stream_does_not_starve_small_connections(start_echo, processes,
                                                               tmp_path):
    """Small request/response connections through gconn keep their p99 within 2x while one
    stream saturates the same worker (its greenlet goes back to the hub after every chunk:
    gevent#1741).  The worker has core 0 to itself; the clients, echo and streams share core 1,
    and the p99 without the stream through gconn is measured beside the same stream sent
    straight to its sink, so the load generator's own cost is in both figures.  A starved
    worker is slower every time, a noisy moment of a shared box once (one CI run saw 3.4x):
    a second pair of measurements, from a fresh gconn, is taken only when the first is over."""
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})  # inherited by the echo and stream processes started here
    pairs = []
    try:
        echo = start_echo()
        for attempt in range(2):
            quiet, busy = quiet_and_busy_p99(echo, processes, tmp_path / f"gconn{attempt}.conf")
            pairs.append((round(quiet * 1000, 2), round(busy * 1000, 2)))
            if busy <= 2 * quiet:
                break
    finally:
        os.sched_setaffinity(0, affinity)
    print(json.dumps({"p99_ms_beside_and_through": pairs}))
    assert busy <= 2 * quiet, f"p99 ms with the stream beside gconn, through it: {pairs}"
