"""Generations of workers at runtime: hard-stop-after caps how long a reloaded generation
drains (and /status lists those still draining); TTIN and TTOU add and remove a worker."""

import json
import signal
import time
import urllib.request

from conftest import connect

from gconn.fleet import draining_generations
from gconn.status import render
from gconn.supervisor import WorkerProcess

HARD_STOP = 2.0  # seconds: the hard-stop-after of the tests


def status(daemon):
    with urllib.request.urlopen(f"http://{daemon.admin}/status", timeout=10) as answer:
        return json.loads(answer.read())


def wait_for(condition, timeout=20.0, what="condition"):
    """Poll ``condition`` (a state check, not a sleep-for-sync) until true or fail."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def echo(client, data=b"ping"):
    client.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = client.recv(len(data))
        assert chunk, "closed"
        received += chunk
    return received


class Beats:
    """Heartbeat counts for the pure test: slot -> connections."""

    def __init__(self, counts):
        self.counts = counts

    def connections(self, slot):
        return self.counts[slot]


def test_draining_generations_add_up_per_generation():
    """Draining workers are summed per generation, oldest first, with the soonest hard stop."""
    workers = [WorkerProcess(0, 2, 11, 0, 0.0, True, None, 105.0),
               WorkerProcess(1, 2, 12, 1, 0.0, True, None, 103.5),
               WorkerProcess(0, 1, 10, 2, 0.0, True)]
    found = draining_generations(workers, Beats({0: 3, 1: 4, 2: 1}), now=100.0)
    assert found == [
        {"generation": 1, "workers": 1, "connections": 1, "hard_stop_in": None},
        {"generation": 2, "workers": 2, "connections": 7, "hard_stop_in": 3.5}]
    text = render({"workers_answering": 1, "workers": 1, "generation": 3, "routes": {},
                   "draining": found})
    assert "draining: generation 2, 2 workers, 7 connections, closed in 3.5s" in text


def test_hard_stop_after_closes_a_reloaded_generation_and_status_lists_it(start_echo,
                                                                          start_daemon):
    """After a HUP the old generation, holding a connection, is listed in /status as draining
    with that connection; hard-stop-after (far below shutdown-timeout) closes it, and the
    list empties."""
    backend = start_echo()
    daemon = start_daemon("--workers", "1", "--bind", "127.0.0.1:0", "--destination",
                          backend.address, "--shutdown-timeout", "10m",
                          "--hard-stop-after", f"{HARD_STOP}s")
    with connect(daemon.port()) as held:
        assert echo(held) == b"ping"
        mark = daemon.mark()
        daemon.signal(signal.SIGHUP)
        daemon.wait_contains("ready workers=1 generation=1", since=mark)
        ready = time.monotonic()
        draining = wait_for(lambda: [entry for entry in status(daemon)["draining"]
                                     if entry["connections"] == 1],
                            what="the old generation's connection in /status")
        assert draining[0]["generation"] == 0 and draining[0]["workers"] == 1
        assert 0 <= draining[0]["hard_stop_in"] <= HARD_STOP
        assert echo(held) == b"ping"  # still served while it drains
        held.settimeout(HARD_STOP + 10)
        assert held.recv(10) == b""  # closed by the hard stop, not by the 10m timeout
        assert time.monotonic() - ready >= HARD_STOP - 1.0
    daemon.wait_contains("after hard-stop-after; closing them", since=mark)
    assert "end=shutdown" in daemon.wait_contains(" end=", since=mark)
    wait_for(lambda: status(daemon)["draining"] == [], what="no generation draining")
