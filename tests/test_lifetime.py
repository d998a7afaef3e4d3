"""max-connection-lifetime: a connection past its lifetime (plus its drawn jitter) is closed at
its first idle moment as ``max_lifetime``, never mid-transfer; bad values are config errors."""

import hashlib
import os
import socket
import threading
import time

import pytest
from conftest import CHUNK, connect
from test_admin import scrape
from test_config import run_gconn
from test_fuzz import BASE_FLAGS, load_or_explain

from gconn.config import load
from gconn.forward import LIFETIME_QUIET, Pump
from gconn.log import parse_fields
from gconn.session import connection_lifetime

SLACK = 0.5  # seconds a loaded machine may add to a close that is due


def lifetime_daemon(start_echo, start_daemon, lifetime, jitter="0"):
    """A one-worker gconn in front of a gconn-echo with the given lifetime and jitter."""
    echo = start_echo()
    return start_daemon("--workers", "1", "--bind", "127.0.0.1:0", "--destination",
                        echo.address, "--max-connection-lifetime", lifetime,
                        "--max-connection-lifetime-jitter", jitter)


def ended(daemon, count=1):
    """The fields of the first ``count`` access lines, waited for in order."""
    lines, mark = [], 0
    for _ in range(count):
        line = daemon.wait_contains(" end=", since=mark)
        mark = daemon.lines.index(line) + 1
        lines.append(parse_fields(line))
    return lines


def read_until_eof(client, timeout=10.0):
    """Read ``client`` to its end; (bytes read, monotonic time the end came)."""
    client.settimeout(timeout)
    total = 0
    while data := client.recv(CHUNK):
        total += len(data)
    return total, time.monotonic()


# pure: the drawn lifetime, and what the pump calls at rest ------------------------------------

def test_a_lifetime_is_drawn_per_connection_within_its_jitter():
    """0 is off whatever the jitter; else the lifetime plus a draw in [0, jitter]."""
    assert connection_lifetime(0, 5.0) is None
    assert connection_lifetime(60.0, 0) == 60.0
    assert connection_lifetime(60.0, 10.0, draw=lambda low, high: high) == 70.0
    draws = {connection_lifetime(60.0, 10.0) for _ in range(100)}
    assert all(60.0 <= drawn <= 70.0 for drawn in draws) and len(draws) > 90


def test_no_timer_unless_a_timeout_or_a_lifetime_is_set():
    """Off (no idle-timeout, no lifetime) the pump arms no timer; a lifetime arms the one
    timer the idle timeout uses."""
    client, client_end = socket.socketpair()
    destination_end, destination = socket.socketpair()
    pump = Pump(client_end, destination_end, 4096, splice=False)
    pump.switch = lambda step: None  # run() sets its greenlet's; only arming is checked here
    try:
        pump.arm_timer()
        assert pump.timer is None
        pump.lifetime_at = pump.loop.now() + 60
        pump.arm_timer()
        assert pump.timer is not None and pump.timer.active
    finally:
        pump.stop()
        for sock in (client, client_end, destination_end, destination):
            sock.close()


def test_a_flow_is_at_rest_only_with_nothing_in_flight():
    """At rest: waiting to read, nothing kept, nothing unread in the source socket, nothing
    the target's peer has not taken; any one of those makes it busy."""
    client, client_end = socket.socketpair()
    destination_end, destination = socket.socketpair()
    pump = Pump(client_end, destination_end, 4096, splice=False)
    flow = pump.to_destination
    try:
        assert not flow.at_rest()  # not reading yet (the reader stops while a chunk is kept)
        flow.reader.start(lambda: None)
        assert flow.at_rest()
        client.send(b"x")  # unread in the source
        assert not flow.at_rest()
        assert client_end.recv(1) == b"x"
        assert flow.at_rest()
        flow.pending = b"y"  # kept for a slow target
        assert not flow.at_rest()
        flow.pending = None
        destination_end.send(b"z")  # sent on, not yet taken by the target's peer
        assert not flow.at_rest()
        assert destination.recv(1) == b"z"
        assert flow.at_rest()
    finally:
        pump.stop()
        for sock in (client, client_end, destination_end, destination):
            sock.close()


# real: a gconn process and an echo over loopback -----------------------------------------------

def test_an_idle_connection_is_closed_after_its_lifetime(start_echo, start_daemon):
    """An open connection with nothing in flight is closed once its lifetime is up: the client
    reads its end, the access line says end=max_lifetime after about the lifetime (within the
    jitter), and the metrics count it."""
    daemon = lifetime_daemon(start_echo, start_daemon, "1s", "200ms")
    with connect(daemon.port()) as client:
        client.sendall(b"hello")
        client.settimeout(5)
        assert client.recv(5) == b"hello"  # forwarding, then nothing either way
        assert read_until_eof(client)[0] == 0
    (line,) = ended(daemon)
    assert line["end"] == "max_lifetime", line
    assert 0.99 <= float(line["duration"]) <= 1.2 + SLACK, line
    assert "past its lifetime" in line["error"]
    samples = scrape(daemon)
    assert samples[("gconn_connections_ended_total",
                    frozenset([("route", "default"), ("end", "max_lifetime")]))] == 1


def test_a_stream_flowing_past_the_lifetime_is_not_cut(start_echo, start_daemon):
    """A stream still flowing when the lifetime passes keeps going (every byte comes back,
    SHA-256 equal); the connection is closed as max_lifetime only after the stream stops, a
    quiet period later."""
    daemon = lifetime_daemon(start_echo, start_daemon, "500ms")
    blob = os.urandom(16 * CHUNK)
    sent, errors, stopped = hashlib.sha256(), [], []
    with connect(daemon.port()) as client:
        opened = time.monotonic()

        def stream():
            """64 KB every 5 ms (about 13 MB/s) until 1 s past the lifetime."""
            try:
                number = 0
                while time.monotonic() < opened + 1.5:
                    chunk = blob[(number % 16) * CHUNK:(number % 16 + 1) * CHUNK]
                    client.sendall(chunk)
                    sent.update(chunk)
                    number += 1
                    time.sleep(0.005)  # pacing the stream, not synchronising
                stopped.append((number * CHUNK, time.monotonic()))
            except OSError as error:
                errors.append(error)

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        received, last_byte = hashlib.sha256(), None
        client.settimeout(10)
        while data := client.recv(CHUNK):
            received.update(data)
            last_byte = time.monotonic()
        closed = time.monotonic()
        sender.join(10)
    assert not errors, errors
    total, stream_stopped = stopped[0]
    assert total >= 4 * 1024 * 1024  # several MB
    assert received.hexdigest() == sent.hexdigest()
    assert last_byte - opened > 1.4  # it flowed well past the lifetime
    assert closed - stream_stopped >= 0.9 * LIFETIME_QUIET  # closed once it had stopped
    (line,) = ended(daemon)
    assert line["end"] == "max_lifetime", line
    assert int(line["bytes_up"]) == int(line["bytes_down"]) == total
    assert float(line["duration"]) >= 1.5


def test_bytes_backed_up_for_a_slow_reader_are_not_cut(start_echo, start_daemon):
    """A client that stops reading with its echo backed up in gconn and the kernel is not
    closed past its lifetime although no byte moves (bytes are in flight); once it reads all
    back (SHA-256 equal) it is closed as max_lifetime."""
    daemon = lifetime_daemon(start_echo, start_daemon, "500ms")
    data = os.urandom(16 * 1024 * 1024)  # more than the socket buffers on the way hold
    errors = []
    with connect(daemon.port()) as client:

        def send():
            try:
                client.sendall(data)
            except OSError as error:
                errors.append(error)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        # nothing moves from about the start: past the lifetime the pump looks once the
        # quiet period is up (about 1 s) and again a period later; no close may come
        with pytest.raises(AssertionError, match="no expected line"):
            daemon.wait_contains(" end=", timeout=2 * LIFETIME_QUIET + 0.2)
        digest = hashlib.sha256()
        client.settimeout(10)
        while data_read := client.recv(CHUNK):
            digest.update(data_read)
        sender.join(10)
    assert not errors, errors
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    (line,) = ended(daemon)
    assert line["end"] == "max_lifetime", line
    assert int(line["bytes_up"]) == int(line["bytes_down"]) == len(data)


def test_jitter_spreads_the_closes(start_echo, start_daemon):
    """Ten connections opened together with lifetime 1s and jitter 1s all close as
    max_lifetime between 1 and 2 seconds, not all together."""
    daemon = lifetime_daemon(start_echo, start_daemon, "1s", "1s")
    clients = [connect(daemon.port()) for _ in range(10)]
    try:
        for client in clients:
            assert read_until_eof(client)[0] == 0
    finally:
        for client in clients:
            client.close()
    lines = ended(daemon, 10)
    assert {line["end"] for line in lines} == {"max_lifetime"}
    durations = sorted(float(line["duration"]) for line in lines)
    assert 0.99 <= durations[0] and durations[-1] <= 2.0 + SLACK, durations
    assert durations[-1] - durations[0] > 0.2, durations  # uniform draws: spread ~0.8 s
    samples = scrape(daemon)
    assert samples[("gconn_connections_ended_total",
                    frozenset([("route", "default"), ("end", "max_lifetime")]))] == 10


# configuration -----------------------------------------------------------------------------------

def test_lifetime_settings_parse_as_durations_per_route():
    """Durations as other settings take them, per route, defaulting to 0 (off)."""
    config, _ = load([*BASE_FLAGS], environ={})
    route = config.routes[0]
    assert route.max_connection_lifetime == 0 and route.max_connection_lifetime_jitter == 0
    config, _ = load([*BASE_FLAGS, "--max-connection-lifetime", "10m",
                      "--max-connection-lifetime-jitter", "30s"], environ={})
    route = config.routes[0]
    assert route.max_connection_lifetime == 600 and route.max_connection_lifetime_jitter == 30


@pytest.mark.parametrize("key, value", [
    ("max-connection-lifetime", "10 parsecs"),
    ("max-connection-lifetime", "-5s"),
    ("max-connection-lifetime-jitter", "soon"),
])
def test_bad_lifetime_in_a_file_exits_2_naming_file_line_and_key(tmp_path, key, value):
    """A bad value in the config file: exit 2, one line naming file:line and the key."""
    path = tmp_path / "bad.conf"
    path.write_text(f"[route:a]\nbind = 127.0.0.1:0\ndestinations = 127.0.0.1:9\n"
                    f"{key} = {value}\n")
    result = run_gconn("-c", str(path), "--check-config")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:4" in lines[0] and key in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_lifetime_flag_and_env_name_their_source():
    """From a flag the error names the flag, from the environment the variable (exit 2)."""
    flag = run_gconn(*BASE_FLAGS, "--max-connection-lifetime", "forever", "--check-config")
    assert flag.returncode == 2 and "--max-connection-lifetime" in flag.stderr
    env = run_gconn(*BASE_FLAGS, "--check-config",
                    env={"GCONN_MAX_CONNECTION_LIFETIME_JITTER": "1 fortnight"})
    assert env.returncode == 2 and "GCONN_MAX_CONNECTION_LIFETIME_JITTER" in env.stderr
    for result in (flag, env):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_too_long_lifetimes_are_refused_naming_the_limit():
    """Like every duration, a lifetime or jitter beyond 10000d is a one-line config error."""
    for flag in ("--max-connection-lifetime", "--max-connection-lifetime-jitter"):
        explanation = load_or_explain([*BASE_FLAGS, f"{flag}=99999999999999d"], environ={})
        assert explanation is not None and flag in explanation and "10000d" in explanation
