"""Generations of workers at runtime: hard-stop-after caps how long a reloaded generation
drains (and /status lists those still draining); TTIN and TTOU add and remove a worker."""

import json
import re
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


def worker_pids(daemon, since=0):
    """{pid: index} of the workers started from line ``since`` on."""
    return {int(match.group(2)): int(match.group(1)) for line in daemon.lines[since:]
            if (match := re.search(r"worker (\d+) started pid=(\d+)", line))}


def test_ttin_adds_a_worker_and_ttou_drains_one(start_echo, start_daemon):
    """TTIN starts worker 2 of 2 configured (logged ready with 3); TTOU drains the highest
    index: its live connection finishes intact while it refuses new ones, then it exits and
    is not replaced; TTOU never goes below one worker."""
    backend = start_echo()
    daemon = start_daemon("--workers", "2", "--bind", "127.0.0.1:0", "--destination",
                          backend.address)
    mark = daemon.mark()
    daemon.signal(signal.SIGTTIN)
    daemon.wait_contains("ready workers=3 generation=0", since=mark)
    (added,) = [pid for pid, index in worker_pids(daemon, mark).items() if index == 2]
    assert status(daemon)["workers"] == 3
    # hold a connection on worker 2, whichever worker the kernel gives it to
    held = []
    while not held:
        client = connect(daemon.port())
        echo(client)
        (connection,) = [c for c in status_connections(daemon)
                         if c["client"] == f"127.0.0.1:{client.getsockname()[1]}"]
        if connection["worker"] == added:
            held.append(client)
        else:
            client.close()
    mark = daemon.mark()
    daemon.signal(signal.SIGTTOU)
    daemon.wait_contains(f"removing worker 2 pid={added}", since=mark)
    daemon.wait_contains("ready workers=2 generation=0", since=mark)
    assert echo(held[0], b"still") == b"still"
    held[0].close()
    daemon.wait_contains(f"worker 2 pid={added} finished", since=mark)
    assert not worker_pids(daemon, mark)  # nothing replaced it
    daemon.signal(signal.SIGTTOU)
    daemon.wait_contains("ready workers=1 generation=0", since=mark)
    mark = daemon.mark()
    daemon.signal(signal.SIGTTOU)
    daemon.wait_contains("TTOU ignored: one worker left", since=mark)
    with connect(daemon.port()) as client:
        assert echo(client) == b"ping"


def status_connections(daemon):
    with urllib.request.urlopen(f"http://{daemon.admin}/connections", timeout=10) as answer:
        found = json.loads(answer.read())
    return found["connections"] if isinstance(found, dict) else found


def test_ttin_count_survives_a_reload_and_limits_are_split_again_by_it(tmp_path,
                                                                        start_echo,
                                                                        start_daemon):
    """TTIN's extra worker takes a share of max-connections made for 3 workers while the
    others keep theirs for 2 (13 of 10 in all) until a HUP splits 10 over the 3 it keeps; a
    reload that changes workers drops TTIN's count."""
    backend = start_echo()
    config = tmp_path / "gconn.conf"
    text = (f"[gconn]\nworkers = 2\n[route:default]\nbind = 127.0.0.1:0\n"
            f"destinations = {backend.address}\nmax-connections = 10\n")
    config.write_text(text)
    daemon = start_daemon("-c", str(config))

    def limit():
        return status(daemon)["routes"]["default"]["limit"]

    assert limit() == 10
    mark = daemon.mark()
    daemon.signal(signal.SIGTTIN)
    daemon.wait_contains("ready workers=3 generation=0", since=mark)
    assert limit() == 5 + 5 + 3
    mark = daemon.mark()
    daemon.signal(signal.SIGHUP)
    daemon.wait_contains("ready workers=3 generation=1", since=mark)
    wait_for(lambda: status(daemon)["workers"] == 3 and limit() == 4 + 3 + 3,
             what="the limit split over 3 workers")
    config.write_text(text.replace("workers = 2", "workers = 1"))
    mark = daemon.mark()
    daemon.signal(signal.SIGHUP)
    daemon.wait_contains("TTIN/TTOU's +1 dropped", since=mark)
    daemon.wait_contains("ready workers=1 generation=2", since=mark)
