"""Under systemd: the notify protocol on a real datagram socket (READY, RELOADING, STOPPING,
STATUS, watchdog; only the supervisor speaks), and conf/gconn.service checked by
systemd-analyze."""

import configparser
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import LINE_TIMEOUT, connect

from gconn import notify
from gconn.settings import BY_NAME, parse_duration
from gconn.supervisor import KILL_GRACE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "conf", "gconn.service")
SOCKET_UNIT = os.path.join(ROOT, "conf", "gconn.socket")
CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifyListener:
    """A datagram socket standing in for systemd's: every message with its sender's pid (as
    systemd checks it, from SCM_CREDENTIALS)."""

    def __init__(self, abstract=False):
        self.directory = tempfile.mkdtemp(prefix="gconn-notify-", dir="/tmp")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"gconn-test-{os.getpid()}-{id(self)}"
            self.socket.bind("\0" + name)
            self.name = "@" + name
        else:
            self.name = os.path.join(self.directory, "notify")
            self.socket.bind(self.name)
        self.messages = []  # (sender pid, monotonic arrival, {key: value})
        self.changed = threading.Condition()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        while True:
            try:
                data, ancillary, _, _ = self.socket.recvmsg(
                    4096, socket.CMSG_SPACE(CREDENTIALS.size))
            except OSError:
                return
            pid = next(CREDENTIALS.unpack(payload[:CREDENTIALS.size])[0]
                       for level, kind, payload in ancillary
                       if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS))
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self.changed:
                self.messages.append((pid, time.monotonic(), fields))
                self.changed.notify_all()

    def wait(self, predicate, since=0, timeout=LINE_TIMEOUT):
        """The index and fields of the first message from index ``since`` on that matches."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for index in range(since, len(self.messages)):
                    if predicate(self.messages[index][2]):
                        return index, self.messages[index][2]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no expected message; got {self.messages}")
                self.changed.wait(remaining)

    def senders(self):
        return {pid for pid, _, _ in self.messages}

    def close(self):
        self.socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def listener():
    made = NotifyListener()
    yield made
    made.close()


def worker_pids(daemon):
    return [int(match.group(1)) for line in daemon.lines
            if (match := re.search(r"worker \d+ started pid=(\d+)", line))]


def test_message_and_socket_address_follow_sd_notify():
    """Fields become KEY=value lines; an @name is an abstract socket address."""
    assert notify.message(ready=1, status="2 workers") == b"READY=1\nSTATUS=2 workers\n"
    assert notify.socket_address("@gconn") == "\0gconn"
    assert notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_notifier_takes_the_variables_out_of_the_environment():
    """The supervisor's Notifier removes NOTIFY_SOCKET and WATCHDOG_* so no child sees them;
    a WATCHDOG_PID naming another process turns the watchdog off."""
    environ = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1",
               "PATH": "/bin"}
    notifier = notify.Notifier(environ)
    try:
        assert environ == {"PATH": "/bin"}
        assert notifier.enabled and notifier.watchdog_interval is None
    finally:
        notifier.abandon()
    notifier = notify.Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000",
                                "WATCHDOG_PID": str(os.getpid())})
    try:
        assert notifier.watchdog_interval == pytest.approx(1.0)
    finally:
        notifier.abandon()
    assert not notify.Notifier({}).enabled


def test_ready_once_every_worker_listens_and_only_the_supervisor_speaks(listener, start_echo,
                                                                        start_daemon):
    """READY=1 comes when both workers listen (a client is served at once), with a STATUS
    naming them; every datagram comes from the supervisor's pid, none from a worker."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--bind", "127.0.0.1:0", "--destination",
                          echo.address, env={"NOTIFY_SOCKET": listener.name}, wait=False)
    _, ready = listener.wait(lambda fields: fields.get("READY") == "1")
    assert "2 workers" in ready["STATUS"]
    daemon.wait_ready()
    with connect(daemon.port()) as client:
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"
        listener.wait(lambda fields: fields.get("STATUS", "").startswith("1 connections"))
    assert listener.senders() == {daemon.popen.pid}
    assert len(worker_pids(daemon)) == 2


def test_abstract_notify_socket(start_echo, start_daemon):
    """NOTIFY_SOCKET=@name (systemd's abstract namespace) is spoken to as well."""
    abstract = NotifyListener(abstract=True)
    try:
        echo = start_echo()
        start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address,
                     env={"NOTIFY_SOCKET": abstract.name})
        abstract.wait(lambda fields: fields.get("READY") == "1")
    finally:
        abstract.close()


def test_reload_says_reloading_then_ready_and_a_failed_one_too(tmp_path, listener,
                                                               start_echo, start_daemon):
    """HUP: RELOADING=1 with MONOTONIC_USEC of now, then READY=1 once generation 1 serves; a
    reload with a broken config still ends with READY=1 and a STATUS saying it failed."""
    echo = start_echo()
    config = tmp_path / "gconn.conf"
    config.write_text(f"[route:default]\nbind = 127.0.0.1:0\ndestinations = {echo.address}\n")
    daemon = start_daemon("-c", str(config), env={"NOTIFY_SOCKET": listener.name})
    first, _ = listener.wait(lambda fields: fields.get("READY") == "1")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.signal(signal.SIGHUP)
    index, reloading = listener.wait(lambda fields: "RELOADING" in fields, since=first + 1)
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= before + 10_000_000
    index, ready = listener.wait(lambda fields: fields.get("READY") == "1", since=index + 1)
    assert "generation 1" in ready["STATUS"]
    mark = daemon.mark()
    config.write_text("[route:default]\nbind = 127.0.0.1:0\n")  # no destinations: refused
    daemon.signal(signal.SIGHUP)
    index, _ = listener.wait(lambda fields: "RELOADING" in fields, since=index + 1)
    _, ready = listener.wait(lambda fields: fields.get("READY") == "1", since=index + 1)
    assert ready["STATUS"].startswith("reload failed")
    daemon.wait_contains("reload failed", since=mark)
    assert listener.senders() == {daemon.popen.pid}


def test_term_says_stopping_when_the_drain_begins(listener, start_echo, start_daemon):
    """TERM with a shutdown-delay: STOPPING=1 at once (systemd shows deactivating), exit 0."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address,
                          "--shutdown-delay", "300ms", env={"NOTIFY_SOCKET": listener.name})
    first, _ = listener.wait(lambda fields: fields.get("READY") == "1")
    daemon.signal(signal.SIGTERM)
    listener.wait(lambda fields: fields.get("STOPPING") == "1", since=first + 1)
    assert daemon.wait_exit() == 0
    assert [fields for _, _, fields in listener.messages].count({"STOPPING": "1"}) == 1


def test_watchdog_pings_only_while_workers_beat(listener, start_echo, start_daemon):
    """With WATCHDOG_USEC the supervisor pings every half period; a stopped worker (silent
    heartbeat) withholds the pings, and they resume once it beats again."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--bind", "127.0.0.1:0", "--destination",
                          echo.address,
                          env={"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "400000"})
    index, _ = listener.wait(lambda fields: "WATCHDOG" in fields)
    index, _ = listener.wait(lambda fields: "WATCHDOG" in fields, since=index + 1)
    (worker,) = worker_pids(daemon)
    os.kill(worker, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        # pings go on until the heartbeat is HEARTBEAT_LATE old, then stop: find a gap of
        # several periods (the wait fails if the pings never stop)
        deadline = stopped + 10.0
        last = len(listener.messages)
        while True:
            assert time.monotonic() < deadline, "pings went on with a silent worker"
            try:
                last, _ = listener.wait(lambda fields: "WATCHDOG" in fields, since=last,
                                        timeout=1.0)
                last += 1
            except AssertionError:
                break
    finally:
        os.kill(worker, signal.SIGCONT)
    listener.wait(lambda fields: "WATCHDOG" in fields, since=last)
    assert listener.senders() == {daemon.popen.pid}


def unit_values():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT)
    return parser


def test_units_pass_systemd_analyze_verify(tmp_path):
    """systemd-analyze verify finds nothing to say about conf/gconn.service and
    conf/gconn.socket (ExecStart pointed at this install's gconn, since verify checks that the
    program exists)."""
    gconn = os.path.join(os.path.dirname(sys.executable), "gconn")
    assert os.access(gconn, os.X_OK), f"{gconn}: gconn is not installed next to python"
    with open(UNIT) as stream:
        text = stream.read()
    assert "ExecStart=/usr/local/bin/gconn " in text
    unit = tmp_path / "gconn.service"
    unit.write_text(text.replace("ExecStart=/usr/local/bin/gconn ", f"ExecStart={gconn} "))
    shutil.copy(SOCKET_UNIT, tmp_path / "gconn.socket")
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "gconn.socket"),
                             str(unit)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_matches_gconn_signals_and_timeouts():
    """Type=notify, reload by HUP, TERM to the supervisor alone, a stop timeout above the
    default drain and a watchdog above worker-timeout, a user of its own, only low ports."""
    service = unit_values()["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (service["KillSignal"], service["KillMode"]) == ("SIGTERM", "mixed")
    drain = parse_duration(BY_NAME["shutdown-delay"].default) + \
        parse_duration(BY_NAME["shutdown-timeout"].default) + KILL_GRACE
    assert parse_duration(service["TimeoutStopSec"]) > drain
    assert parse_duration(service["WatchdogSec"]) > \
        parse_duration(BY_NAME["worker-timeout"].default)
    assert service["DynamicUser"] == "yes" and service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == service["AmbientCapabilities"] == \
        "CAP_NET_BIND_SERVICE"
    assert int(service["LimitNOFILE"]) >= 65536
