"""Pre-forked workers under the supervisor: shared accepts, restarts, reload, hangs, orphans."""

import collections
import hashlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import Daemon, connect, echo_roundtrip, which_tag

from gconn.capacity import capacity, workers_needed
from gconn.heartbeat import Heartbeats

STREAM = 4 * 1024 * 1024  # bytes each verified stream sends in two halves


def worker_pids(daemon, generation=0):
    """{worker index: pid} of the workers the supervisor started for ``generation``."""
    pids = {}
    for line in daemon.lines:
        match = re.search(r"worker (\d+) started pid=(\d+) generation=(\d+)", line)
        if match and int(match.group(3)) == generation:
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def owner_of(client, pids):
    """The worker pid whose accepted socket is the other end of ``client``."""
    local = client.getsockname()
    for pid in pids:
        for connection in psutil.Process(pid).net_connections(kind="tcp"):
            if connection.raddr and tuple(connection.raddr) == local:
                return pid
    raise AssertionError(f"no worker holds {local}")


def wait_for(condition, timeout=20.0, what="condition"):
    """Poll ``condition`` (a state check, not a sleep-for-sync) until true or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Stream:
    """An echo stream sent in two halves, so that it can be under way across an event."""

    def __init__(self, port):
        self.data = os.urandom(STREAM)
        self.client = connect(port, timeout=30)
        self.digest = hashlib.sha256()
        self.received = 0

    def _receive_until(self, count):
        while self.received < count:
            chunk = self.client.recv(65536)
            if not chunk:
                return False
            self.digest.update(chunk)
            self.received += len(chunk)
        return True

    def first_half(self):
        self.client.sendall(self.data[:STREAM // 2])
        assert self._receive_until(STREAM // 2)

    def finish(self):
        """Send the rest and read to the end; True when every byte came back intact."""
        try:
            self.client.sendall(self.data[STREAM // 2:])
            self.client.shutdown(socket.SHUT_WR)
            self._receive_until(STREAM)
            tail = self.client.recv(1)
        except OSError:
            return False
        finally:
            self.client.close()
        intact = self.received == STREAM and \
            self.digest.hexdigest() == hashlib.sha256(self.data).hexdigest()
        return intact and tail == b""


def test_three_workers_share_accepts(start_echo, start_daemon):
    """workers=3: every worker is started, reports ready, and accepts some of 90 clients."""
    echo = start_echo()
    daemon = start_daemon("--workers", "3", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    assert "ready workers=3" in daemon.wait_contains("ready workers=")
    pids = set(worker_pids(daemon).values())
    assert len(pids) == 3
    owners = collections.Counter()
    clients = [connect(daemon.port()) for _ in range(90)]
    for client in clients:
        client.sendall(b"x")
        assert client.recv(1) == b"x"  # accepted and forwarding: a worker holds it now
        owners[owner_of(client, pids)] += 1
    for client in clients:
        client.close()
    assert set(owners) == pids, owners
    data = b"spread" * 1000
    assert echo_roundtrip(daemon.port(), data)[1] == len(data)


def test_killed_worker_is_replaced_and_other_streams_continue(start_echo, start_daemon):
    """kill -9 one worker: streams on the others finish intact, a new worker takes its place."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    pids = worker_pids(daemon)
    streams = [Stream(daemon.port()) for _ in range(12)]
    for stream in streams:
        stream.first_half()
    owners = [owner_of(stream.client, pids.values()) for stream in streams]
    victim = pids[0]
    assert victim in owners and set(owners) - {victim}, "both workers must hold streams"
    mark = daemon.mark()
    os.kill(victim, signal.SIGKILL)
    daemon.wait_contains(f"pid={victim} died", since=mark)
    daemon.wait_contains("ready workers=2 generation=0", since=mark)
    for stream, owner in zip(streams, owners, strict=True):
        if owner != victim:
            assert stream.finish(), "a stream on a surviving worker was harmed"
        else:
            stream.client.close()
    replacement = worker_pids(daemon)[0]
    assert replacement != victim and psutil.pid_exists(replacement)
    data = os.urandom(100_000)
    for _ in range(6):
        assert echo_roundtrip(daemon.port(), data)[0] == hashlib.sha256(data).hexdigest()


def write_config(path, destination):
    path.write_text(f"[gconn]\nworkers = 2\nshutdown-timeout = 30s\n"
                    f"[route:main]\nbind = 127.0.0.1:0\ndestinations = {destination}\n")


def test_hup_reloads_destinations_while_old_streams_finish(tmp_path, tag_servers,
                                                           start_daemon):
    """HUP with a new destination: new clients reach it; a stream begun before ends intact."""
    old, new = tag_servers(2)
    path = tmp_path / "gconn.conf"
    write_config(path, f"127.0.0.1:{old.port}")
    daemon = start_daemon("-c", str(path))
    port = daemon.port("main")
    stream = Stream(port)
    with stream.client.makefile("rb") as reader:
        assert reader.readline() == b"d0\n"  # the tag comes before the echo
    stream.first_half()
    write_config(path, f"127.0.0.1:{new.port}")
    mark = daemon.mark()
    daemon.signal(signal.SIGHUP)
    daemon.wait_contains("ready workers=2 generation=1", since=mark)
    first = daemon.wait_contains("refusing new connections", since=mark)  # old ones retire
    daemon.wait_contains("refusing new connections", since=daemon.lines.index(first) + 1)
    assert [which_tag(port) for _ in range(6)] == ["d1"] * 6
    assert stream.finish()


def test_hup_with_broken_config_keeps_serving(tmp_path, tag_servers, start_daemon):
    """HUP with a broken config: the error is logged and the old config keeps serving."""
    (server,) = tag_servers(1)
    path = tmp_path / "gconn.conf"
    write_config(path, f"127.0.0.1:{server.port}")
    daemon = start_daemon("-c", str(path))
    path.write_text(path.read_text() + "strategy = fastest\n")
    daemon.signal(signal.SIGHUP)
    line = daemon.wait_contains("reload failed")
    assert "strategy" in line and "fastest" in line
    assert [which_tag(daemon.port("main")) for _ in range(4)] == ["d0"] * 4


def test_hung_worker_is_killed_and_replaced(start_echo, start_daemon):
    """A worker that stops its heartbeat (SIGSTOP) is killed after worker-timeout and replaced."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--worker-timeout", "3s", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    victim = worker_pids(daemon)[0]
    mark = daemon.mark()
    os.kill(victim, signal.SIGSTOP)
    daemon.wait_contains(f"pid={victim} silent", since=mark)
    daemon.wait_contains("ready workers=1 generation=0", since=mark)
    assert echo_roundtrip(daemon.port(), b"alive")[1] == 5


def test_workers_leave_when_the_supervisor_dies(start_echo, start_daemon):
    """kill -9 the supervisor: its workers notice and exit by themselves."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--shutdown-timeout", "1s", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    pids = list(worker_pids(daemon).values())
    daemon.popen.kill()
    daemon.popen.wait()
    wait_for(lambda: not any(psutil.pid_exists(pid) and
                             psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                             for pid in pids), what="orphaned workers to exit")


def test_process_titles_tell_supervisor_from_worker(start_echo, start_daemon):
    """ps shows 'gconn: supervisor' and 'gconn: worker N'."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    titles = {pid: " ".join(psutil.Process(pid).cmdline())
              for pid in worker_pids(daemon).values()}
    assert all(title.startswith("gconn: worker") for title in titles.values()), titles
    assert " ".join(psutil.Process(daemon.popen.pid).cmdline()).startswith("gconn: supervisor")


@pytest.mark.timeout(120)
def test_out_of_descriptors_pauses_accepts_without_harming_live_ones(start_echo, processes):
    """A worker out of descriptors logs once, pauses accepting, keeps live streams whole."""
    echo = start_echo()
    limit = 160  # open files for the whole daemon: about 40 forwarded connections fit

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    daemon = Daemon(["--workers", "1", "--max-connections", "1000", "--bind", "127.0.0.1:0",
                     "--destination", echo.address], preexec=low_limit)
    processes.append(daemon)
    streams = [Stream(daemon.port()) for _ in range(30)]
    for stream in streams:
        stream.first_half()
    extra = []
    for _ in range(60):  # more than fit: the worker runs out while accepting or connecting
        extra.append(socket.create_connection(("127.0.0.1", daemon.port()), timeout=10))
    daemon.wait_contains("pausing accepts")
    worker = psutil.Process(worker_pids(daemon)[0])
    cpu_before = sum(worker.cpu_times()[:2])
    time.sleep(1.0)  # measuring that an exhausted worker stays idle over one second
    assert sum(worker.cpu_times()[:2]) - cpu_before < 0.3, "the worker spins while out"
    assert sum("pausing accepts" in line for line in daemon.lines) == 1
    for stream in streams:
        assert stream.finish(), "a live stream was harmed by descriptor exhaustion"
    for client in extra:
        client.close()
    data = os.urandom(10_000)
    wait_for(lambda: echo_roundtrip(daemon.port(), data)[1] == len(data), what="recovery")


def test_ctrl_c_to_the_process_group_drains_instead_of_cutting(start_echo, start_daemon):
    """SIGINT to the whole group (a terminal's Ctrl-C): live connections drain, not cut."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--shutdown-timeout", "30s",
                          "--bind", "127.0.0.1:0", "--destination", echo.address)
    with connect(daemon.port()) as client:
        client.sendall(b"before")
        assert client.recv(10) == b"before"
        mark = daemon.mark()
        os.killpg(daemon.popen.pid, signal.SIGINT)
        first = daemon.wait_contains("refusing new connections", since=mark)
        daemon.wait_contains("refusing new connections", since=daemon.lines.index(first) + 1)
        client.sendall(b"during the drain")
        assert client.recv(100) == b"during the drain"
    assert daemon.wait_exit() == 0


def test_hangup_to_the_process_group_reloads_without_killing_workers(start_echo,
                                                                     start_daemon):
    """SIGHUP to the whole group: a reload, and no worker dies of the signal."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    with connect(daemon.port()) as client:
        mark = daemon.mark()
        os.killpg(daemon.popen.pid, signal.SIGHUP)
        daemon.wait_contains("ready workers=2 generation=1", since=mark)
        client.sendall(b"still here")
        assert client.recv(100) == b"still here"
    assert not any("died" in line for line in daemon.lines[mark:])


def test_hup_during_a_drain_is_ignored(start_echo, start_daemon):
    """HUP after TERM does not bring the daemon back: it finishes stopping."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    with connect(daemon.port()) as client:  # keeps the drain going until it leaves
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        mark = daemon.mark()
        daemon.signal(signal.SIGTERM)
        daemon.wait_contains("refusing new connections", since=mark)
        daemon.signal(signal.SIGHUP)
        daemon.wait_contains("reload ignored: stopping", since=mark)
    assert daemon.wait_exit() == 0
    assert not any("generation=1" in line for line in daemon.lines[mark:])


def test_worker_killed_by_a_realtime_signal_is_replaced(start_echo, start_daemon):
    """A worker killed by a signal with no name (SIGRTMIN+6) is reported and replaced."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    victim = worker_pids(daemon)[0]
    mark = daemon.mark()
    os.kill(victim, signal.SIGRTMIN + 6)
    daemon.wait_contains(f"pid={victim} died (signal {signal.SIGRTMIN + 6})", since=mark)
    daemon.wait_contains("ready workers=1", since=mark)
    assert echo_roundtrip(daemon.port(), b"alive")[1] == 5


@pytest.mark.parametrize("loop", ["epoll", "poll", "select", "libuv"])
def test_every_event_loop_choice_forwards(loop, start_echo, start_daemon):
    """loop = epoll | poll | select | libuv: the daemon runs on it and forwards verified bytes."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--loop", loop, "--bind", "127.0.0.1:0",
                          "--destination", echo.address)
    data = os.urandom(2 * 1024 * 1024)
    assert echo_roundtrip(daemon.port(), data) == (hashlib.sha256(data).hexdigest(), len(data))


def test_capacity_is_two_descriptors_per_connection_after_the_reserve():
    """capacity and workers_needed count (limit - 64) // 2 connections per worker."""
    assert capacity(200, 2) == 136
    assert workers_needed(136, 200) == 2
    assert workers_needed(137, 200) == 3
    assert workers_needed(1000, 200) == 15


def test_check_config_prints_the_capacity_warnings_the_supervisor_logs(tmp_path, processes):
    """Too few descriptors and a route below the worker count: --check-config prints the same
    two warnings the supervisor logs at start."""
    path = tmp_path / "gconn.conf"
    path.write_text("[gconn]\nworkers = 3\nadmin = 127.0.0.1:0\n"
                    "[route:big]\nbind = 127.0.0.1:0\ndestinations = 127.0.0.1:9\n"
                    "max-connections = 1000\n"
                    "[route:small]\nbind = 127.0.0.1:0\ndestinations = 127.0.0.1:9\n"
                    "max-connections = 2\n")

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    result = subprocess.run([sys.executable, "-m", "gconn", "-c", str(path), "--check-config"],
                            capture_output=True, text=True, preexec_fn=low_limit, timeout=30)
    assert result.returncode == 0, result.stderr
    warnings = [line.removeprefix("; warning: ") for line in result.stdout.splitlines()
                if line.startswith("; warning: ")]
    assert len(warnings) == 2, result.stdout
    assert "set workers = 15" in warnings[0] and "route=small" in warnings[1]
    daemon = Daemon(["-c", str(path)], preexec=low_limit)
    processes.append(daemon)
    for warning in warnings:
        daemon.wait_contains(warning)  # the supervisor logs the very same sentence


def test_a_heartbeat_being_stamped_never_reads_as_silent():
    """A worker stamping its slot while the supervisor reads it: every read is a real stamp.
    (struct.pack_into zeroed the slot before writing it: 16,094 of 1.4 million reads saw 0,
    and under load the supervisor killed a healthy worker as silent for the uptime.)"""
    beats = Heartbeats(slots=4)
    slot = beats.take()
    child = os.fork()
    if child == 0:  # the worker: stamp as fast as it can for a second
        try:
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                beats.beat(slot, 7)
        finally:
            os._exit(0)
    reads = implausible = 0
    try:
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            reads += 1
            implausible += not 0 <= beats.age(slot) < 5
    finally:
        os.waitpid(child, 0)
    assert reads > 10_000 and implausible == 0


def test_reloads_under_a_connect_loop_refuse_and_reset_no_one(tmp_path, start_echo,
                                                             start_daemon):
    """Five HUPs while eight clients connect and echo back to back: not one connect refused
    or reset.  Each worker index keeps its listening socket across generations (the
    supervisor holds it), so what queued for an old worker is accepted by its successor."""
    echo = start_echo()
    path = tmp_path / "gconn.conf"
    write_config(path, echo.address)
    daemon = start_daemon("-c", str(path))
    port = daemon.port("main")
    stop = threading.Event()
    failures, served = [], collections.Counter()

    def loop(number):
        while not stop.is_set():
            try:
                with connect(port) as client:
                    client.sendall(b"%08d" % number)
                    got = b""
                    while len(got) < 8 and (data := client.recv(8 - len(got))):
                        got += data
                if got != b"%08d" % number:
                    failures.append(f"echo {got!r}")
                served[number] += 1
            except OSError as error:
                failures.append(repr(error))

    threads = [threading.Thread(target=loop, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    try:
        for generation in range(1, 6):
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            daemon.wait_contains(f"ready workers=2 generation={generation}", since=mark)
            first = daemon.wait_contains("finished", since=mark)  # both old workers are gone
            daemon.wait_contains("finished", since=daemon.lines.index(first) + 1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:5]
    assert all(served[number] for number in range(8))
