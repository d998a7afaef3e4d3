"""The admin endpoint over real HTTP against a running daemon: liveness under load, readiness,
live connections, the config, security and errors, and ``gconn status``."""

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import connect, echo_roundtrip, free_port

from gconn.fleet import route_totals


def get(daemon, path, token=None, timeout=10):
    """(status, body text) of GET path on the daemon's admin endpoint."""
    request = urllib.request.Request(f"http://{daemon.admin}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.timeout(180)
def test_livez_answers_fast_while_every_worker_is_saturated(start_echo, start_daemon):
    """/livez stays 200 and quick while both workers forward bulk streams flat out."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    data = os.urandom(64 * 1024 * 1024)
    stop = threading.Event()

    def saturate():
        while not stop.is_set():
            echo_roundtrip(daemon.port(), data, timeout=120)

    load = [threading.Thread(target=saturate) for _ in range(4)]
    for thread in load:
        thread.start()
    times = []
    try:
        for _ in range(100):
            begun = time.perf_counter()
            assert get(daemon, "/livez") == (200, "ok\n")
            times.append(time.perf_counter() - begun)
    finally:
        stop.set()
        for thread in load:
            thread.join(120)
    p95 = statistics.quantiles(times, n=20)[18]
    print(f"/livez under load: median {statistics.median(times) * 1e3:.2f} ms, "
          f"p95 {p95 * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms")
    assert p95 < 0.050


def test_readyz_follows_destination_health_and_hung_workers(start_daemon, tag_servers):
    """/readyz: 200 when serving; 503 with the reason when all destinations are down or a
    worker does not answer."""
    (server,) = tag_servers(1)
    daemon = start_daemon("--workers", "2", "--check-interval", "100ms", "--fall", "1",
                          "--rise", "1", "--bind", "127.0.0.1:0",
                          "--destination", f"127.0.0.1:{server.port}")
    assert get(daemon, "/readyz") == (200, "ready\n")
    server.stop()
    daemon.wait_contains("is down")
    deadline = time.monotonic() + 10
    while (answer := get(daemon, "/readyz"))[0] == 200:  # every worker's checks see it
        assert time.monotonic() < deadline
        time.sleep(0.05)  # polling readiness
    status, body = answer
    assert status == 503 and "route default: no healthy destination" in body
    server.start()
    deadline = time.monotonic() + 10
    while get(daemon, "/readyz")[0] != 200:
        assert time.monotonic() < deadline, "never ready again"
        time.sleep(0.05)  # polling readiness
    worker = int(daemon.wait_contains("worker 0 started").split("pid=")[1].split()[0])
    mark = daemon.mark()
    os.kill(worker, signal.SIGKILL)  # its listeners are gone until the replacement's are up
    status, body = get(daemon, "/readyz")
    assert status == 503 and "worker" in body, body
    daemon.wait_contains("ready workers=2", since=mark)
    assert get(daemon, "/readyz") == (200, "ready\n")
    worker = int(daemon.wait_contains("worker 0 started", since=mark)
                 .split("pid=")[1].split()[0])
    os.kill(worker, signal.SIGSTOP)
    try:
        status, body = get(daemon, "/readyz")
    finally:
        os.kill(worker, signal.SIGCONT)
    assert status == 503 and f"worker pid={worker} not answering" in body


def test_connections_lists_a_thousand_live_ones_with_byte_counts(start_echo, start_daemon):
    """/connections pages through 1,000 live connections with their exact byte counts."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    clients, sizes = [], {}
    try:
        for number in range(1000):
            client = connect(daemon.port())
            size = number + 1
            client.sendall(b"x" * size)
            received = 0
            while received < size:
                received += len(client.recv(size - received))
            host, port = client.getsockname()
            sizes[f"{host}:{port}"] = size
            clients.append(client)
        seen = {}
        offset = 0
        while True:
            status, body = get(daemon, f"/connections?limit=300&offset={offset}")
            assert status == 200
            page = json.loads(body)
            assert page["total"] == 1000 and page["limit"] == 300
            for entry in page["connections"]:
                seen[entry["client"]] = entry
            offset += 300
            if offset >= 1000:
                break
        assert set(seen) == set(sizes)
        for client, entry in seen.items():
            assert entry["bytes_up"] == entry["bytes_down"] == sizes[client]
            assert entry["phase"] == "forwarding" and entry["destination"] == echo.address
            assert entry["route"] == "default" and entry["worker"] > 0
        assert len({entry["worker"] for entry in seen.values()}) == 2
        status, body = get(daemon, "/connections?route=nothing")
        assert json.loads(body)["total"] == 0
        first = next(iter(sizes))
        status, body = get(daemon, f"/connections?client={first}")
        assert [entry["client"] for entry in json.loads(body)["connections"]] == [first]
    finally:
        for client in clients:
            client.close()


def test_config_shows_values_and_origins(start_daemon):
    """/config: the effective config, each value with its origin."""
    daemon = start_daemon("--workers", "1", "--bind", "127.0.0.1:0",
                          "--destination", f"127.0.0.1:{free_port()}",
                          "--connect-timeout", "750ms")
    status, body = get(daemon, "/config")
    config = json.loads(body)
    assert status == 200
    assert config["route:default"]["connect-timeout"] == {"value": "750ms",
                                                          "source": "flag --connect-timeout"}
    assert config["gconn"]["log-level"] == {"value": "info", "source": "default"}


def test_bad_paths_and_queries(start_daemon):
    """404 for unknown paths and methods, 400 with one line of JSON for bad query values."""
    daemon = start_daemon("--workers", "1", "--bind", "127.0.0.1:0",
                          "--destination", f"127.0.0.1:{free_port()}")
    assert get(daemon, "/nope")[0] == 404
    for query in ("limit=0", "limit=abc", "offset=-1", "colour=blue", "stack=2", "stack=yes"):
        status, body = get(daemon, f"/connections?{query}")
        assert status == 400 and body.count("\n") == 1 and "error" in json.loads(body)
    assert get(daemon, "/connections?stack=2") == (400, '{"error": "stack must be 0 or 1"}\n')
    assert get(daemon, "/connections?stack=0")[0] == 200


def test_admin_beyond_loopback_needs_a_token(start_daemon, tmp_path):
    """Beyond loopback: no token is a config error; with one, 401 without it, 200 with it,
    except the probes /livez and /readyz, which answer their status (not reasons) to anyone."""
    result = subprocess.run(
        [sys.executable, "-m", "gconn", "--admin", "0.0.0.0:0", "--bind", "127.0.0.1:0",
         "--destination", "127.0.0.1:9", "--check-config"], capture_output=True, text=True)
    assert result.returncode == 2 and "admin-token-file" in result.stderr
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    daemon = start_daemon("--workers", "1", "--admin", "0.0.0.0:0",
                          "--admin-token-file", str(token_file), "--bind", "127.0.0.1:0",
                          "--destination", f"127.0.0.1:{free_port()}", "--shutdown-delay", "10m")
    daemon.admin = "127.0.0.1:" + daemon.admin.rsplit(":", 1)[1]
    for path in ("/status", "/connections", "/config", "/metrics"):
        assert get(daemon, path) == (401, '{"error": "unauthorized"}\n'), path
        assert get(daemon, path, token="wrong")[0] == 401, path
        assert get(daemon, path, token="s3cret-token")[0] == 200, path
    assert get(daemon, "/livez") == (200, "ok\n")
    assert get(daemon, "/livez", token="s3cret-token") == (200, "ok\n")
    assert get(daemon, "/readyz") == (200, "ready\n")
    daemon.signal(signal.SIGTERM)  # the delay: not ready, with a reason to hide or show
    daemon.wait_contains("still accepting for shutdown-delay")
    assert get(daemon, "/readyz", token="s3cret-token") == (503, "not ready\nstopping\n")
    assert get(daemon, "/readyz") == (503, "not ready\n")
    assert get(daemon, "/readyz", token="wrong") == (503, "not ready\n")
    insecure = start_daemon("--workers", "1", "--admin", "0.0.0.0:0", "--admin-insecure",
                            "--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{free_port()}")
    insecure.admin = "127.0.0.1:" + insecure.admin.rsplit(":", 1)[1]
    assert get(insecure, "/livez") == (200, "ok\n")


def test_gconn_status_prints_a_summary_per_route(start_echo, start_daemon):
    """gconn status reads /status and prints active/limit, queued, shed, destinations."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--max-connections", "50", "--bind",
                          "127.0.0.1:0", "--destination", echo.address)
    with connect(daemon.port()) as client:
        client.sendall(b"hi")
        assert client.recv(2) == b"hi"
        result = subprocess.run([sys.executable, "-m", "gconn", "status", "--admin",
                                 daemon.admin], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("gconn: 2/2 workers answering")
    row = next(line for line in lines if line.startswith("default"))
    assert "1/50" in row and f"{echo.address} 2/0" in row
    down = subprocess.run([sys.executable, "-m", "gconn", "status", "--admin",
                           f"127.0.0.1:{free_port()}"], capture_output=True, text=True)
    assert down.returncode == 1 and "cannot read" in down.stderr


def worker_report(active, healthy):
    """One worker's control-socket report with one route and one destination."""
    return {"routes": {"default": {
        "address": "127.0.0.1:6446", "listening": True, "serving": healthy,
        "greenlets": active + 1, "pool_size": 35, "accept_pauses": 1, "active": active,
        "limit": 25, "queued": 1, "max_queued": 10, "admitted": 7 * active, "blocked_hosts": 0,
        "shed": {"queue_full": active, "queue_timeout": 0},
        "top_hosts": [["10.0.0.1", active], [f"10.0.0.{active}", 1]],
        "destinations": [{"address": "127.0.0.1:9001", "healthy": healthy, "active": active}]}}}


def test_route_totals_sum_the_workers_that_answered():
    """/status totals: counts and shed reasons summed, a destination up/down per worker, the
    top client hosts summed, a worker that did not answer left out."""
    totals = route_totals([worker_report(3, True), None, worker_report(2, False)])
    assert totals == {"default": {
        "address": "127.0.0.1:6446", "workers": 2, "greenlets": 7, "pool_size": 70,
        "accept_pauses": 2,
        "active": 5, "limit": 50, "queued": 2,
        "max_queued": 20, "admitted": 35, "blocked_hosts": 0,
        "shed": {"queue_full": 5, "queue_timeout": 0},
        "top_hosts": [{"host": "10.0.0.1", "connections": 5},
                      {"host": "10.0.0.3", "connections": 1},
                      {"host": "10.0.0.2", "connections": 1}],
        "destinations": {"127.0.0.1:9001": {"up": 1, "down": 1, "active": 5,
                                            "state": "ready", "weight": 1}}}}


def scrape(daemon):
    """{(name, frozenset(labels)): value} from /metrics, parsed by prometheus-client."""
    from prometheus_client.parser import text_string_to_metric_families
    status, body = get(daemon, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def test_metrics_count_exactly_and_survive_a_worker_restart(start_echo, start_daemon):
    """After known connections the counters equal them; a killed worker's counts stay once."""
    echo = start_echo()
    refused = f"127.0.0.1:{free_port()}"
    daemon = start_daemon("--workers", "2", "--strategy", "first-available", "--bind",
                          "127.0.0.1:0", "--destination", refused,
                          "--destination", echo.address)
    sizes = [1000 * (number + 1) for number in range(10)]

    def run(batch):
        mark = daemon.mark()
        for size in batch:
            assert echo_roundtrip(daemon.port(), b"m" * size)[1] == size
        for _ in batch:  # each session has ended (and counted) once its line is out
            mark = daemon.lines.index(daemon.wait_contains(" end=", since=mark)) + 1

    def expect(samples, count, total):
        route = ("route", "default")
        assert samples[("gconn_connections_accepted_total", frozenset([route]))] == count
        assert samples[("gconn_connections_ended_total",
                        frozenset([route, ("end", "client_closed")]))] == count
        for direction in ("up", "down"):
            assert samples[("gconn_forwarded_bytes_total", frozenset(
                [route, ("destination", echo.address), ("direction", direction)]))] == total
        assert samples[("gconn_destination_connect_errors_total",
                        frozenset([route, ("destination", refused)]))] == count
        assert samples[("gconn_session_seconds_count", frozenset([route]))] == count
        assert samples[("gconn_connect_seconds_count", frozenset([route]))] == count

    run(sizes)
    expect(scrape(daemon), 10, sum(sizes))
    victim = int(daemon.wait_contains("worker 0 started").split("pid=")[1].split()[0])
    mark = daemon.mark()
    os.kill(victim, signal.SIGKILL)
    daemon.wait_contains("ready workers=2", since=mark)
    expect(scrape(daemon), 10, sum(sizes))  # nothing lost, nothing counted twice
    run(sizes[:3])
    expect(scrape(daemon), 13, sum(sizes) + sum(sizes[:3]))
    live = [labels for name, labels in scrape(daemon) if name == "gconn_worker_connections"]
    assert str(victim) not in {dict(labels)["pid"] for labels in live}


def test_a_destination_listed_twice_is_counted_once_per_connection(start_echo, start_daemon):
    """Listing one address twice (to weight round-robin) sums its counts in one series."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--bind", "127.0.0.1:0", "--destination",
                          echo.address, "--destination", echo.address)
    mark = daemon.mark()
    for _ in range(4):
        assert echo_roundtrip(daemon.port(), b"w" * 1000)[1] == 1000
    for _ in range(4):
        mark = daemon.lines.index(daemon.wait_contains(" end=", since=mark)) + 1
    samples = scrape(daemon)
    route = ("route", "default")
    assert samples[("gconn_destination_connections_total",
                    frozenset([route, ("destination", echo.address)]))] == 4
    assert samples[("gconn_forwarded_bytes_total", frozenset(
        [route, ("destination", echo.address), ("direction", "up")]))] == 4000
    assert "Traceback" not in "".join(daemon.lines)
