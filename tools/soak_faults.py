"""gconn-soak's fault injection (``--faults``): each fault, in turn, while every client holds
its verified echo stream, and a per-fault account of what it did.

The faults (``FAULTS``):

- ``kill-worker``: SIGKILL one current worker; only its connections may end (as the client
  sees them: a close or a reset), and the supervisor starts its replacement;
- ``reload``: SIGHUP three times within the fault: no stream may be cut;
- ``destination-reset``: the first echo process resets every connection it has (SIGUSR1):
  those clients see a close, gconn's access log names each as ``destination_closed``;
- ``destination-stall``: the last echo process stops reading (SIGUSR2, then again to go on):
  its clients' echoes wait (late, never lost), gconn's memory held meanwhile is reported;
- ``slow-readers``: every client process turns a tenth of its clients into slow readers
  (SIGUSR1, twice): gconn's memory per slow reader and the other clients' p99 are reported;
- ``slowloris``: a process of its own opens ``loris`` connections from 127.0.250.x that send
  nothing: gconn must reclaim every one (idle-timeout) without cutting anyone else;
- ``flood``: ``flood`` connects in a burst from 127.0.251.x at a second route kept full: the
  soak route's p99 is reported beside its p99 before.

Each fault has a slot of the hold: a quiet ``gap`` (the "before" of its latency figure), the
fault itself, and a settle time.  What the clients counted per second of the monotonic clock
(cuts, late and lost echoes) and gconn's access-log lines are summed over the slot, so each
fault is accounted by itself.  A probe thread connects a new client every 100 ms through the
route: the time from the fault until new clients are served normally again (a second of
probes that all came back) is its recovery time.  ``python -m gconn_tools.soak_faults loris``
and ``... flood`` are the load processes of those two faults.
"""

import argparse
import calendar
import collections
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

from gconn.log import parse_fields

FAULTS = ("kill-worker", "reload", "destination-reset", "destination-stall", "slow-readers",
          "slowloris", "flood")
CUTTING = ("kill-worker", "destination-reset")  # faults whose clients' streams may end
PROBE_EVERY = 0.1  # seconds between probe clients
PROBE_TIMEOUT = 2.0  # seconds a probe may take
RECOVERED_AFTER = 1.0  # seconds of probes that all came back: served normally again
RELOADS = 3  # HUPs of the reload fault
LORIS_SOURCES = "127.0.250"  # the slowloris connections' source addresses (.1 to .8)
FLOOD_SOURCES = "127.0.251"
PROBE_HEADER = struct.Struct("!QII")  # as soak_client's messages: gconn-echo returns them


def parse_faults(text):
    """``--faults``: a comma-separated list of FAULTS, or ``all``; ValueError otherwise."""
    names = list(FAULTS) if text.strip() == "all" else [
        name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAULTS]
    if unknown or not names:
        raise ValueError(f"unknown fault {unknown[0]!r}" if unknown else "no fault named")
    return names


def slot_seconds(options):
    """(gap, active, settle): the seconds of each part of one fault's slot."""
    gap = max(2.0, 2 * options.interval)
    active = max(3.0, 2 * options.interval)
    settle = options.late_after + options.interval + 1.0
    return gap, active, settle


def hold_seconds(options):
    """How long the clients must hold their streams for every fault's slot to pass."""
    gap, active, settle = slot_seconds(options)
    loris = idle_timeout(options) + 2.0  # slowloris lasts until gconn reclaimed them
    return sum(gap + (max(active, loris) if name == "slowloris" else active) + settle
               for name in options.faults) + gap


def idle_timeout(options):
    """gconn's idle-timeout in a fault run: longer than two echo intervals (the clients stay
    busy), short enough that slowloris connections are reclaimed within the run."""
    return round(2 * options.interval + 1.0, 3)


class Probe(threading.Thread):
    """A new client every PROBE_EVERY through ``target``: connect, one echo, close; keeps
    (monotonic time, came back whole)."""

    def __init__(self, target):
        super().__init__(daemon=True)
        host, _, port = target.rpartition(":")
        self.address = (host.strip("[]"), int(port))
        self.results = []
        self.stopping = threading.Event()

    def run(self):
        number = 0
        while not self.stopping.wait(PROBE_EVERY):
            number += 1
            payload = os.urandom(16)
            message = PROBE_HEADER.pack(number, len(payload), zlib.crc32(payload)) + payload
            began = time.monotonic()
            try:
                with socket.create_connection(self.address, timeout=PROBE_TIMEOUT) as client:
                    client.sendall(message)
                    back = b""
                    while len(back) < len(message) and (data := client.recv(4096)):
                        back += data
                ok = back == message
            except OSError:
                ok = False
            self.results.append((began, ok))

    def recovered(self, since):
        """Seconds from ``since`` until the first second of probes that all came back, or
        None when that never happened."""
        run_start = None
        for began, ok in self.results:
            if began < since:
                continue
            if not ok:
                run_start = None
                continue
            if run_start is None:
                run_start = began
            if began - run_start >= RECOVERED_AFTER:
                return round(run_start - since, 2)
        return None


class Injector:
    """Runs the faults in their slots (``step`` from the soak's sampling loop) and accounts
    for each (``results``)."""

    def __init__(self, fleet, options, gconn, echoes, target, flood_target):
        self.fleet, self.options, self.gconn = fleet, options, gconn
        self.echoes, self.target, self.flood_target = echoes, target, flood_target
        self.gap, self.active, self.settle = slot_seconds(options)
        self.pending = list(options.faults)
        self.faults = []  # one dict per fault begun
        self.current = None
        self.next_at = None  # monotonic time the next fault begins
        self.clients = []
        self.probe = Probe(target)
        self.holders = []  # connections keeping the flood route full

    def start(self, clients):
        """The hold began (every client connected): schedule the first fault."""
        self.clients = clients
        self.next_at = time.monotonic() + self.gap
        self.probe.start()
        self.fill_flood_route()

    def step(self, sample):
        """Called about once a second with gconn's latest sample: begin, advance or end the
        current fault."""
        now = time.monotonic()
        fault = self.current
        if fault is not None:
            if sample:
                fault["rss_max"] = max(fault["rss_max"], sample["rss"])
            if now >= fault["ends"] and not fault.get("ended"):
                self.end(fault, now)
            if now >= fault["ends"] + self.settle and fault.get("ended"):
                self.current = None
                self.next_at = now + self.gap
            elif fault["name"] == "reload" and fault["reloads"] < RELOADS and \
                    now >= fault["begun"] + fault["reloads"] * self.active / RELOADS:
                self.reload(fault)
            return
        if self.pending and self.next_at is not None and now >= self.next_at:
            self.begin(self.pending.pop(0), now, sample)

    @property
    def done(self):
        return not self.pending and self.current is None

    def begin(self, name, now, sample):
        fault = {"name": name, "begun": now, "begun_wall": time.time(), "ends": now + self.active,
                 "rss_before": sample["rss"] if sample else 0,
                 "rss_max": sample["rss"] if sample else 0}
        print(f"gconn-soak: fault {name}", flush=True)
        if name == "kill-worker":
            workers = self.current_workers()
            victim = random.choice(workers)
            fault["worker_pid"] = victim
            os.kill(victim, signal.SIGKILL)
        elif name == "reload":
            fault["reloads"] = 0
            self.reload(fault)
        elif name == "destination-reset":
            os.kill(self.echoes[0].pid, signal.SIGUSR1)
        elif name == "destination-stall":
            os.kill(self.echoes[-1].pid, signal.SIGUSR2)
        elif name == "slow-readers":
            for process in self.clients:
                os.kill(process.pid, signal.SIGUSR1)
        elif name == "slowloris":
            fault["ends"] = now + max(self.active, idle_timeout(self.options) + 2.0)
            fault["process"] = self.load("loris", self.target, self.options.loris,
                                         LORIS_SOURCES, fault["ends"] - now)
        elif name == "flood":
            fault["process"] = self.load("flood", self.flood_target, self.options.flood,
                                         FLOOD_SOURCES, self.active)
        self.faults.append(fault)
        self.current = fault

    def end(self, fault, now):
        fault["ended"] = now
        fault["ended_wall"] = time.time()
        name = fault["name"]
        if name == "destination-stall":
            os.kill(self.echoes[-1].pid, signal.SIGUSR2)
        elif name == "slow-readers":
            for process in self.clients:
                os.kill(process.pid, signal.SIGUSR1)
        elif "process" in fault:
            process = fault.pop("process")
            output, _ = process.communicate(timeout=60)
            fault["load"] = json.loads(output) if output.strip() else {"error": "no report"}

    def reload(self, fault):
        os.kill(self.gconn.pid, signal.SIGHUP)
        fault["reloads"] += 1

    def current_workers(self):
        """The pids of gconn's newest generation of workers (the supervisor's children, by
        their process titles); older ones, still draining after a reload, are left out."""
        import psutil
        workers = {}
        for child in psutil.Process(self.gconn.pid).children():
            title = " ".join(child.cmdline())
            generation = int(title.rsplit("generation ", 1)[1].split(")")[0]) \
                if "generation " in title else 0
            workers.setdefault(generation, []).append(child.pid)
        return workers[max(workers)] if workers else []

    def load(self, kind, target, count, sources, seconds):
        """Start a loris or flood process (this module run as a program)."""
        return self.fleet.start(f"{kind}{len(self.faults)}", [
            sys.executable, "-m", "gconn_tools.soak_faults", kind, "--target", target,
            "--count", str(count), "--sources", sources, "--seconds", f"{seconds:.1f}"],
            stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def fill_flood_route(self):
        """Hold connections on the flood route so that its every place is taken."""
        if self.flood_target is None:
            return
        host, _, port = self.flood_target.rpartition(":")
        for _ in range(10 * max(1, len(self.current_workers()))):
            try:
                holder = socket.create_connection((host, int(port)), timeout=5)
                holder.sendall(b"x")
                self.holders.append(holder)
            except OSError:
                break

    def stop(self):
        self.probe.stopping.set()
        self.probe.join(PROBE_TIMEOUT + 1)
        for holder in self.holders:
            holder.close()
        if self.current is not None and not self.current.get("ended"):
            self.end(self.current, time.monotonic())

    def results(self, by_second, timeline, started, access_log, gconn_log):
        """One account per fault: what it cut (as the clients saw it and as gconn logged
        it), echoes lost or late in its slot, the p99 before and during, recovery, and what
        is particular to it."""
        ends = read_ends(access_log)
        accounts = []
        now = time.monotonic()
        for index, fault in enumerate(self.faults):  # a fault's slot: until the next one's gap
            until = self.faults[index + 1]["begun"] - self.gap / 2 \
                if index + 1 < len(self.faults) else \
                min(now, fault.get("ended", now) + self.settle)
            until_wall = fault["begun_wall"] + (until - fault["begun"])
            window = range(int(fault["begun"]), int(until) + 1)
            counted = {kind: sum(counts.get(second, 0) for second in window)
                       for kind, counts in by_second.items()}
            logged = collections.Counter(
                end for at, end, host in ends
                if fault["begun_wall"] - 0.5 <= at < until_wall and regular_client(host))
            before = [p["p99_ms"] for p in timeline if p["p99_ms"] is not None and
                      fault["begun"] - self.gap <= started + p["t"] < fault["begun"]]
            during = [p["p99_ms"] for p in timeline if p["p99_ms"] is not None and
                      fault["begun"] <= started + p["t"] < fault.get("ended", until)]
            account = {
                "fault": fault["name"],
                "at_s": round(fault["begun"] - started, 1),
                "cut": counted.get("cut", 0), "lost": counted.get("lost", 0),
                "late": counted.get("late", 0),
                "gconn_logged": dict(logged),
                "p99_before_ms": max(before) if before else None,
                "p99_during_ms": max(during) if during else None,
                "recovery_s": self.probe.recovered(fault["begun"]),
                "rss_held_mb": round((fault["rss_max"] - fault["rss_before"]) / 2**20, 1),
            }
            if account["p99_before_ms"] and account["p99_during_ms"] is not None:
                account["p99_ratio"] = round(account["p99_during_ms"]
                                             / account["p99_before_ms"], 2)
            particular(account, fault, self.options, gconn_log)
            accounts.append(account)
        return accounts


def particular(account, fault, options, gconn_log):
    """What one kind of fault adds to its account."""
    name = fault["name"]
    if name == "kill-worker":
        account["worker_pid"] = fault["worker_pid"]
        account["replaced_s"], account["worker_held"] = replacement(gconn_log,
                                                                    fault["worker_pid"])
    elif name == "reload":
        account["reloads"] = fault["reloads"]
    elif name in ("slowloris", "flood"):
        account["load"] = fault.get("load")
    if name == "slow-readers":
        slow = max(1, options.clients // 10)
        account["slow_readers"] = slow
        account["held_kb_per_slow_reader"] = round(
            (fault["rss_max"] - fault["rss_before"]) / slow / 1024, 1)


def replacement(gconn_log, pid):
    """(seconds from the supervisor's "pid=P died" line to its next "ready workers=" line,
    the connections that line says the worker had), None for what the log does not say."""
    died = held = None
    with open(gconn_log, errors="replace") as stream:
        for line in stream:
            if died is None and f"pid={pid} died" in line:
                died = daemon_line_time(line)
                words = line.split(" with ", 1)[1].split() if " with " in line else []
                held = int(words[0]) if words and words[0].isdigit() else None
            elif died is not None and "ready workers=" in line:
                return round(daemon_line_time(line) - died, 3), held
    return None, held


def daemon_line_time(line):
    """Seconds of a daemon-log line's leading local time (``2026-12-07 03:25:01,123``), on a
    scale of its own: for differences between lines."""
    day, clock = line.split(" ", 2)[:2]
    whole, _, millis = clock.partition(",")
    return time.mktime(time.strptime(f"{day} {whole}", "%Y-%m-%d %H:%M:%S")) \
        + int(millis or 0) / 1000


def line_time(line):
    """The epoch seconds of an access-log line's leading ISO time (UTC, milliseconds)."""
    stamp = line.split(" ", 1)[0].rstrip("Z")
    whole, _, millis = stamp.partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis or 0) / 1000


def read_ends(path):
    """[(epoch seconds it ended, end, client host)] of every access-log line (a line's time
    is when its connection began; its duration says when it ended)."""
    found = []
    if not path or not os.path.exists(path):
        return found
    with open(path, errors="replace") as stream:
        for line in stream:
            fields = parse_fields(line)
            if "end" in fields and "client" in fields:
                found.append((line_time(line) + float(fields.get("duration", 0)),
                              fields["end"], fields["client"].rsplit(":", 1)[0]))
    return found


def regular_client(host):
    """Whether an access line's client is one of the soak's clients (not a probe from
    127.0.0.1, nor a slowloris or flood connection)."""
    return host.startswith("127.0.") and not host.startswith(
        ("127.0.0.", LORIS_SOURCES + ".", FLOOD_SOURCES + "."))


def problems(accounts):
    """What the faults did that they must not: echoes lost or corrupted in any slot, streams
    cut by a fault that must cut none, cuts gconn did not log, slowloris connections gconn
    did not reclaim, a fault with no recovery."""
    found = []
    for account in accounts:
        name = account["fault"]
        if account["lost"]:
            found.append(f"{name}: {account['lost']} echoes lost silently")
        if account["cut"] and name not in CUTTING:
            found.append(f"{name}: {account['cut']} streams cut")
        held = account.get("worker_held")
        if name == "kill-worker" and (held is None or account["cut"] > held):
            found.append(f"kill-worker: {account['cut']} streams cut, the killed worker held "
                         f"{held}")
        logged = sum(count for end, count in account["gconn_logged"].items()
                     if end != "client_closed")
        if name == "destination-reset" and logged < account["cut"]:
            found.append(f"{name}: {account['cut']} streams cut, gconn logged {logged}")
        load = account.get("load") or {}
        if name == "slowloris" and load.get("still_open"):
            found.append(f"slowloris: {load['still_open']} connections not reclaimed")
        if account["recovery_s"] is None:
            found.append(f"{name}: new clients were not served normally again")
    return found


def table(accounts):
    """The faults' rows of the soak's report table."""
    rows = []
    for account in accounts:
        extra = {key: account[key] for key in ("worker_pid", "worker_held", "replaced_s",
                                               "reloads",
                                               "held_kb_per_slow_reader", "load")
                 if key in account}
        rows.append((f"fault {account['fault']} at {account['at_s']} s",
                     f"cut {account['cut']} (gconn logged {account['gconn_logged'] or 0}), "
                     f"lost {account['lost']}, late {account['late']}, p99 ms "
                     f"{account['p99_before_ms']} -> {account['p99_during_ms']}, recovered "
                     f"after {account['recovery_s']} s, gconn RSS +{account['rss_held_mb']} MB"
                     + (f", {extra}" if extra else "")))
    return rows


# the load processes of slowloris and flood ------------------------------------------------

def open_connection(target, source):
    """A non-blocking connect to ``target`` from the address ``source`` begun."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
    sock.bind((source, 0))
    sock.connect_ex(target)
    return sock


def loris(target, count, sources, seconds):
    """``count`` connections that send nothing, held until gconn closes them or ``seconds``
    pass: {connected, failed, reclaimed, still_open, last_reclaimed_s}."""
    began = time.monotonic()
    poller = select.epoll()
    socks = {}
    for number in range(count):
        sock = open_connection(target, f"{sources}.{number % 8 + 1}")
        socks[sock.fileno()] = sock
        poller.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    reclaimed, failed, last = 0, 0, None
    while socks and time.monotonic() - began < seconds:
        for fd, _ in poller.poll(0.2):
            sock = socks.pop(fd)
            poller.unregister(fd)
            try:
                sock.recv(1)
                reclaimed += 1
                last = time.monotonic() - began
            except ConnectionRefusedError:
                failed += 1
            except OSError:
                reclaimed += 1
                last = time.monotonic() - began
            sock.close()
    still = len(socks)
    for sock in socks.values():
        sock.close()
    return {"connected": count - failed, "failed": failed, "reclaimed": reclaimed,
            "still_open": still, "last_reclaimed_s": None if last is None else round(last, 2)}


def flood(target, count, sources, seconds):
    """``count`` connects as fast as this process makes them (at most 1,000 at once), each
    closed once it connected or failed: {connects, connected, failed, seconds}."""
    began = time.monotonic()
    poller = select.epoll()
    pending = {}
    started = connected = failed = 0
    while (started < count or pending) and time.monotonic() - began < seconds + 30:
        while started < count and len(pending) < 1000:
            sock = open_connection(target, f"{sources}.{started % 8 + 1}")
            pending[sock.fileno()] = sock
            poller.register(sock.fileno(), select.EPOLLOUT)
            started += 1
        for fd, _ in poller.poll(0.1):
            sock = pending.pop(fd)
            poller.unregister(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                failed += 1
            else:
                connected += 1
            sock.close()
    return {"connects": started, "connected": connected, "failed": failed,
            "seconds": round(time.monotonic() - began, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="soak_faults")
    parser.add_argument("kind", choices=("loris", "flood"))
    parser.add_argument("--target", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--sources", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    options = parser.parse_args(argv)
    host, _, port = options.target.rpartition(":")
    run = loris if options.kind == "loris" else flood
    report = run((host.strip("[]"), int(port)), options.count, options.sources, options.seconds)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
