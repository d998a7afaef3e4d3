"""Admission on real sockets: the bounded queue, shedding, floods, health checks, blocked hosts."""

import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time

from conftest import connect, echo_roundtrip, which_tag
from test_greenlets import round_trips

BUSY = b"BUSY\r\n"


def bound_client(source, port):
    """A client connected to 127.0.0.1:port from the loopback address ``source``."""
    client = socket.socket()
    client.settimeout(10)
    client.bind((source, 0))
    client.connect(("127.0.0.1", port))
    return client


def read_to_end(client, timeout=10):
    """Everything the peer sends until it closes."""
    client.settimeout(timeout)
    chunks = []
    while chunk := client.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def readable(client, timeout):
    """Whether ``client`` has data (or end-of-stream) within ``timeout`` seconds."""
    return bool(select.select([client], [], [], timeout)[0])


def summary(daemon, route):
    """The route's counters from the summary line a stopping worker writes."""
    line = daemon.wait_contains(f"route={route} admitted=")
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def test_queue_serves_in_arrival_order_and_sheds_when_full(start_echo, start_daemon):
    """10 served, 5 queued then served in arrival order, the 16th shed with the message."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--max-connections", "10", "--max-queued", "5",
                          "--queue-timeout", "60s", "--shed-message", "BUSY\\r\\n",
                          "--bind", "127.0.0.1:0", "--destination", echo.address)
    port = daemon.port()
    served = [connect(port) for _ in range(10)]
    for number, client in enumerate(served):
        client.sendall(b"%d" % number)
        assert client.recv(10) == b"%d" % number
    queued = []
    for number in range(5):
        client = connect(port)
        client.sendall(b"q%d" % number)  # waits in the kernel until its session starts
        queued.append(client)
    started = time.monotonic()
    with connect(port) as sixteenth:
        assert read_to_end(sixteenth) == BUSY
    elapsed = time.monotonic() - started
    print(f"16th client shed in {elapsed * 1000:.1f} ms")
    assert elapsed < 0.25
    for number, client in enumerate(queued):
        assert not readable(client, 0.05), "a queued client was served before a slot freed"
        served[number].close()
        client.settimeout(10)
        assert client.recv(10) == b"q%d" % number  # the longest waiting one got the slot
        for later in queued[number + 1:]:
            assert not readable(later, 0.05), "served out of arrival order"
    for client in served[5:] + queued:
        client.close()
    daemon.signal(signal.SIGTERM)
    counts = summary(daemon, "default")
    assert counts["admitted"] == "15" and counts["queued"] == "5"
    assert counts["shed_queue_full"] == "1" and counts["shed_queue_timeout"] == "0"
    assert "end=queue_full" in daemon.wait_contains("end=queue_full")


def test_queued_client_past_queue_timeout_is_shed(start_echo, start_daemon):
    """A client waiting longer than queue-timeout is shed with the message and counted."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--max-connections", "1", "--max-queued", "5",
                          "--queue-timeout", "300ms", "--shed-message", "BUSY\\r\\n",
                          "--bind", "127.0.0.1:0", "--destination", echo.address)
    with connect(daemon.port()) as holder:
        holder.sendall(b"x")
        assert holder.recv(1) == b"x"
        started = time.monotonic()
        with connect(daemon.port()) as waiting:
            assert read_to_end(waiting) == BUSY
        assert 0.28 <= time.monotonic() - started < 2.0
    daemon.signal(signal.SIGTERM)
    counts = summary(daemon, "default")
    assert counts["shed_queue_timeout"] == "1" and counts["admitted"] == "1"


FLOOD = """
import collections, json, socket, sys, threading
port, replies, lock = int(sys.argv[1]), collections.Counter(), threading.Lock()
def flood():
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                reply = b"".join(iter(lambda: client.recv(4096), b"")).decode()
        except OSError as error:
            reply = type(error).__name__
        with lock:
            replies[reply] += 1
threads = [threading.Thread(target=flood) for _ in range(20)]
print("flooding", flush=True)
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(replies))
"""  # 20 threads x 100 connection attempts at the full route, each read to its close


def percentile_99(samples):
    return statistics.quantiles(samples, n=100)[98]


def test_flood_at_a_full_route_does_not_stop_another_route(start_echo, start_daemon, tmp_path):
    """2,000 connection attempts at a full route while another route serves verified echoes."""
    echo = start_echo()
    config = (f"[gconn]\nworkers = 1\n[route:full]\nbind = 127.0.0.1:0\n"
              f"destinations = {echo.address}\nmax-connections = 1\nmax-queued = 10\n"
              f"queue-timeout = 200ms\nshed-message = BUSY\n"
              f"[route:other]\nbind = 127.0.0.1:0\ndestinations = {echo.address}\n")
    daemon = start_daemon(config=config, tmp=str(tmp_path))
    full, other = daemon.port("full"), daemon.port("other")
    holder = connect(full)
    holder.sendall(b"x")
    assert holder.recv(1) == b"x"

    quiet = round_trips(other, 300)
    flooder = subprocess.Popen(  # its own process: the flood must not take this one's GIL
        [sys.executable, "-c", FLOOD, str(full)], stdout=subprocess.PIPE, text=True)
    assert flooder.stdout.readline().strip() == "flooding"
    busy = round_trips(other, 300)
    shed = json.loads(flooder.communicate(timeout=120)[0])
    holder.close()
    ratio = percentile_99(busy) / percentile_99(quiet)
    print(f"other route p99 quiet {percentile_99(quiet) * 1e3:.3f} ms, during the flood "
          f"{percentile_99(busy) * 1e3:.3f} ms: ratio {ratio:.2f}")
    assert shed == {"BUSY": 2000}, shed


def test_dead_destination_is_quarantined_and_rejoins_after_rise(tag_servers, start_daemon):
    """Killed: nobody is handed it while the other is up; restarted: back after rise checks."""
    d0, d1 = tag_servers(2)
    daemon = start_daemon("--workers", "1", "--strategy", "round-robin",
                          "--check-interval", "200ms", "--rise", "2", "--fall", "2",
                          "--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{d0.port}",
                          "--destination", f"127.0.0.1:{d1.port}")
    port = daemon.port()
    assert {which_tag(port) for _ in range(4)} == {"d0", "d1"}
    d0.stop()
    assert [which_tag(port) for _ in range(20)] == ["d1"] * 20  # failover, then quarantine
    daemon.wait_contains(f"destination 127.0.0.1:{d0.port} is down")
    mark = daemon.mark()
    d0.start()
    daemon.wait_contains(f"destination 127.0.0.1:{d0.port} is up", since=mark)
    assert {which_tag(port) for _ in range(4)} == {"d0", "d1"}


def test_all_destinations_down_sheds_no_destination(start_daemon):
    """With every destination quarantined, new clients are shed as no_destination at once."""
    from conftest import free_port
    daemon = start_daemon("--workers", "1", "--check-interval", "100ms", "--fall", "1",
                          "--shed-message", "DOWN", "--bind", "127.0.0.1:0",
                          "--destination", f"127.0.0.1:{free_port()}")
    daemon.wait_contains("is down")
    with connect(daemon.port()) as client:
        assert read_to_end(client) == b"DOWN"
    assert "end=no_destination" in daemon.wait_contains("end=no_destination")


def test_max_connect_errors_blocks_one_host_for_blocked_host_time(tag_servers, start_daemon):
    """A host whose clients keep closing without a byte is blocked, others are not; it is
    served again after blocked-host-time."""
    (server,) = tag_servers(1)
    daemon = start_daemon("--workers", "1", "--max-connect-errors", "3",
                          "--blocked-host-time", "1s", "--shed-message", "BLOCKED",
                          "--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{server.port}")
    port = daemon.port()
    for _ in range(3):
        mark = daemon.mark()
        bound_client("127.0.0.2", port).close()  # connected, then gone without a byte
        daemon.wait_contains("client=127.0.0.2", since=mark)
    daemon.wait_contains("client host 127.0.0.2 blocked")
    blocked_at = time.monotonic()
    with bound_client("127.0.0.2", port) as client:
        assert read_to_end(client) == b"BLOCKED"
    with bound_client("127.0.0.3", port) as client:
        client.settimeout(10)
        assert client.recv(10) == b"d0\n"
    deadline = time.monotonic() + 10
    while True:
        with bound_client("127.0.0.2", port) as client:
            reply = client.recv(10)
        if reply == b"d0\n":
            break
        assert reply == b"BLOCKED" and time.monotonic() < deadline
        time.sleep(0.1)  # pacing retries until the block ends
    assert time.monotonic() - blocked_at >= 0.9
    assert echo_roundtrip(port, b"")[1] == 3  # the tag only: the route serves as before


def test_clients_that_hang_up_while_queued_are_not_host_failures(start_echo, start_daemon):
    """Clients that give up while waiting are closed, not connected onwards, not counted."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--max-connections", "1", "--max-queued", "10",
                          "--max-connect-errors", "2", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    port = daemon.port()
    holder = connect(port)
    holder.sendall(b"x")
    assert holder.recv(1) == b"x"
    for _ in range(3):
        connect(port).close()  # queued, then gone
    mark = daemon.mark()
    holder.close()
    for _ in range(4):  # the holder's line and three for the clients that left
        mark = daemon.lines.index(daemon.wait_contains(" end=", since=mark)) + 1
    assert not any("blocked" in line for line in daemon.lines)
    assert echo_roundtrip(port, b"served")[1] == 6
    gone = [line for line in daemon.lines if "destination=-" in line and "client_closed" in line]
    assert len(gone) == 3


def test_idle_admin_clients_do_not_hold_up_worker_restarts(start_echo, start_daemon):
    """Idle connections to the admin endpoint time out; a dead worker is still replaced."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    host, port = daemon.admin.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(5)]
    try:
        victim = int(daemon.wait_contains("worker 0 started").split("pid=")[1].split()[0])
        mark = daemon.mark()
        os.kill(victim, signal.SIGKILL)
        daemon.wait_contains("ready workers=1", since=mark, timeout=15)
    finally:
        for connection in idle:
            connection.close()
    assert echo_roundtrip(daemon.port(), b"alive")[1] == 5
