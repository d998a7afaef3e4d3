"""gconn-soak: open many client connections through gconn, keep them busy with verified echoes,
and report what happened to gconn, told apart from what happened to the harness.

By default it starts what it needs: gconn-echo destination processes (several ports, since
ephemeral ports run out at about 28,000 per source and destination), a gconn with a generated
config and enough workers for the descriptor limit, and client processes (each one epoll loop,
source addresses spread over 127.0.x.y).  ``--target`` soaks a router that is already running;
``--config`` starts gconn with the user's config; ``--baseline`` first runs the same clients
against the echo destinations directly, so gconn's added latency is measured in the same run.

Every echo carries a sequence number and a CRC-32 and must come back byte for byte.  Outcomes:
verified; *late* (came back after ``--late-after``; counted with its delay); *lost* (never came
back although the connection stayed open); *corrupted*; and *cut* connections (ended by the far
side while the client still used them; named with the end reason in gconn's access log).  The
run fails on lost or corrupted echoes, cut connections, late echoes above ``--max-late``
percent, connect failures over ``--max-failures``, gconn dying, or gconn not returning to its
baseline after the clients leave.  The client processes measure their own loop lag and CPU; the
report shows gconn's CPU beside the harness's and warns when the harness is the bottleneck.
Every process it starts is in a process group of its own and is stopped on exit, Ctrl-C
included.

``--faults kill-worker,reload,...`` (or ``all``) injects faults one after another while every
client holds its stream (soak_faults.py) and reports each one by itself: streams cut (as the
clients saw them and as gconn logged them), echoes lost silently (must be 0) or late, the p99
before and during, gconn's memory held, and how soon new clients were served normally again.
"""

import argparse
import atexit
import collections
import itertools
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from gconn_tools import soak_faults
from gconn_tools.soak_client import bucket_value

from gconn.log import parse_fields
from gconn.sockets import open_descriptors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where tools/ lives
CLIENTS_PER_PROCESS = 16_000  # client sockets per client process (limit 20,000 descriptors)
# gconn's connections per echo port: far below the 28,232 ephemeral ports per source address
# and destination, and below the 14,116 even ones that connect() tries first.  Past those a
# connect's search for a free port costs 16-20x more (1.1-1.5 ms instead of 70 us, measured),
# which at 14,300 per port made gconn's connects the costliest thing on the box.
CONNECTIONS_PER_ECHO_PORT = 5_000
CONNECTIONS_PER_ECHO_PROCESS = 16_000  # echo sockets per echo process
WORKER_HEADROOM = 1.25  # gconn workers for this many times the clients (accepts spread unevenly)
DESCRIPTOR_RESERVE = 64  # as gconn.sockets: descriptors a worker keeps for itself
READY_TIMEOUT = 60.0  # seconds to wait for a started process to say it is ready
SETTLE_TIMEOUT = 60.0  # seconds gconn may take to return to baseline after the clients leave
RSS_REGROWTH = 0.1  # a second wave may grow RSS by this share of the first wave's growth
RSS_NOISE = 2 * 2**20  # bytes per gconn process of growth that are allocator noise
RSS_SETTLE = 2.5  # seconds after the descriptors return for the workers to trim memory
PROGRESS_EVERY = 2.0  # seconds between progress lines (when not on a terminal)
SAMPLE_EVERY = 1.0  # seconds between samples of gconn's memory, CPU and descriptors
CUTS_REPORTED = 50  # cut connections listed by address in the report (all are counted)
SATURATED = 0.9  # share of the machine's CPU in use above which latencies include CPU waits
CPU_PARTS = ("gconn", "clients", "echo", "soak")  # whose CPU seconds a timeline point holds


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="gconn-soak", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000, help="concurrent clients")
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="new connections per second while ramping up")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds to hold every client connected after the ramp")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds between echoes per client")
    parser.add_argument("--payload", type=int, default=64, help="bytes of payload per echo")
    parser.add_argument("--churn", type=float, default=0.0,
                        help="fraction of clients that close and reconnect each second")
    parser.add_argument("--late-after", type=float, default=1.0, metavar="SECONDS",
                        help="an echo that takes longer than this is late (default 1)")
    parser.add_argument("--max-late", type=float, default=1.0, metavar="PERCENT",
                        help="late echoes tolerated, in percent of all (default 1)")
    parser.add_argument("--drain", type=float, default=30.0, metavar="SECONDS",
                        help="after the hold, how long echoes in flight may take before they "
                             "count as lost (default 30)")
    parser.add_argument("--max-failures", type=int, default=0,
                        help="connect failures tolerated before the run fails")
    parser.add_argument("--max-lag", type=float, default=100.0, metavar="MS",
                        help="client loop lag p99 above which the report warns that the "
                             "harness, not gconn, is the bottleneck (default 100)")
    parser.add_argument("--clients-per-process", type=int, default=CLIENTS_PER_PROCESS,
                        help=f"clients per client process (default {CLIENTS_PER_PROCESS})")
    parser.add_argument("--baseline", action="store_true",
                        help="first run the same clients against the echo destinations "
                             "directly, and report gconn's added latency")
    parser.add_argument("--target", metavar="HOST:PORT",
                        help="soak this running router instead of starting one")
    parser.add_argument("--config", metavar="FILE",
                        help="start gconn with this config (its first route is soaked)")
    parser.add_argument("--workers", type=int, default=0,
                        help="gconn workers to start (0: enough for the descriptor limit)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON here")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw concurrency, echo p99, harness lag, gconn's memory and "
                             "descriptors, and CPU use over time (needs matplotlib)")
    parser.add_argument("--no-second-wave", dest="second_wave", action="store_false",
                        help="skip the leak check's second wave (connect all, close at once)")
    parser.add_argument("--faults", type=soak_faults.parse_faults, default=[],
                        metavar="FAULT,...", help="inject these faults in turn while the "
                        "clients hold their streams: " + ", ".join(soak_faults.FAULTS) +
                        ", or all; each is reported by itself")
    parser.add_argument("--loris", type=int, default=None, metavar="COUNT",
                        help="connections of the slowloris fault (default: the clients, at "
                             "most 2000)")
    parser.add_argument("--flood", type=int, default=20_000, metavar="COUNT",
                        help="connects of the flood fault (default 20000)")
    parser.add_argument("--echo-args", default="", help=argparse.SUPPRESS)  # tests: bad echo
    options = parser.parse_args(argv)
    if options.faults:
        if options.target or options.config:
            parser.error("--faults needs the soak's own gconn and echo destinations: not "
                         "with --target or --config")
        options.loris = min(options.clients, 2000) if options.loris is None else options.loris
        options.duration = max(options.duration, soak_faults.hold_seconds(options))
    if options.clients < 1 or options.rate <= 0 or options.duration < 0 or options.payload < 0:
        parser.error("--clients and --rate must be positive, --duration and --payload >= 0")
    if options.interval <= 0 or options.late_after <= 0 or options.clients_per_process < 1:
        parser.error("--interval, --late-after and --clients-per-process must be positive")
    if options.baseline and (options.target or options.config):
        parser.error("--baseline needs the soak's own echo destinations: "
                     "not with --target or --config")
    return options


class Fleet:
    """Every process the soak starts; each in its own process group, all stopped at exit."""

    def __init__(self):
        self.processes = []
        self.scratch = tempfile.mkdtemp(prefix="gconn-soak-")
        atexit.register(self.stop_all)

    def start(self, name, args, **kwargs):
        log_path = os.path.join(self.scratch, f"{name}.log")
        log = open(log_path, "w")  # noqa: SIM115 - closed in stop_all
        process = subprocess.Popen(args, stdout=kwargs.pop("stdout", log), stderr=log,
                                   stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        process.log_path, process.log, process.name = log_path, log, name
        self.processes.append(process)
        return process

    def stop(self, process, signum=signal.SIGTERM, timeout=15.0):
        """Stop one process group politely, then by force."""
        for sig in (signum, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(process.pid, signal.SIGKILL)  # leftovers of its group (workers)
        except ProcessLookupError:
            pass
        process.wait()

    def stop_all(self):
        for process in reversed(self.processes):
            self.stop(process, signal.SIGKILL, timeout=5)
            process.log.close()
        self.processes.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)


def wait_for_line(process, text, timeout=READY_TIMEOUT, count=1):
    """Lines of ``process``'s log containing ``text`` once there are ``count``; else fail."""
    deadline = time.monotonic() + timeout
    while True:
        with open(process.log_path) as stream:
            lines = [line.strip() for line in stream if text in line]
        if len(lines) >= count:
            return lines
        if process.poll() is not None:
            raise SystemExit(f"gconn-soak: {process.name} exited ({process.returncode}) "
                             f"before '{text}'; see its log:\n" + tail(process.log_path))
        if time.monotonic() > deadline:
            raise SystemExit(f"gconn-soak: {process.name} did not say '{text}' in "
                             f"{timeout:.0f}s:\n" + tail(process.log_path))
        time.sleep(0.05)  # polling a log file for a line, not synchronising on time


def tail(path, lines=15):
    with open(path, errors="replace") as stream:
        return "".join(stream.readlines()[-lines:])


def start_echoes(fleet, options):
    """Start enough gconn-echo processes and ports; return (processes, addresses)."""
    count = max(1, math.ceil(options.clients / CONNECTIONS_PER_ECHO_PROCESS))
    if options.faults:  # one to reset, one to stall, and one left alone
        count = max(count, 3)
    ports = max(count, math.ceil(options.clients / CONNECTIONS_PER_ECHO_PORT) + 1)
    per_process = math.ceil(ports / count)
    processes, addresses = [], []
    for index in range(count):
        binds = [arg for _ in range(per_process) for arg in ("--bind", "127.0.0.1:0")]
        process = fleet.start(f"echo{index}", [sys.executable, "-m", "gconn.echo", *binds,
                                               *options.echo_args.split()])
        for line in wait_for_line(process, "listening address=", count=per_process):
            addresses.append(line.split("address=", 1)[1])
        processes.append(process)
    return processes, addresses


def workers_for(clients):
    """gconn workers needed to hold ``clients`` forwarded connections with headroom."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_worker = (hard - DESCRIPTOR_RESERVE) // 2
    return max(1, math.ceil(clients * WORKER_HEADROOM / per_worker))


def start_gconn(fleet, options, destinations):
    """Start gconn with a generated config (or the user's); return (process, target, access
    log path or None)."""
    access_log = None
    if options.config:
        path = options.config
    else:
        workers = options.workers or workers_for(options.clients)
        if options.faults:  # a killed worker must leave others serving
            workers = max(workers, 2)
        path = os.path.join(fleet.scratch, "soak.conf")
        access_log = os.path.join(fleet.scratch, "access.log")
        # with faults: reloads must not cut the streams the old workers drain, slowloris
        # connections must be reclaimed, and a second route is there to be flooded
        idle = soak_faults.idle_timeout(options) if options.faults else 0
        shutdown = "1h" if options.faults else "5s"
        with open(path, "w") as stream:
            stream.write(
                f"[gconn]\nworkers = {workers}\nlog-level = info\naccess-log = {access_log}\n"
                f"admin =\nshutdown-timeout = {shutdown}\n\n[route:soak]\n"
                f"bind = 127.0.0.1:0\ndestinations = {', '.join(destinations)}\n"
                f"strategy = round-robin\nmax-connections = {options.clients * 2}\n"
                f"backlog = 65535\nidle-timeout = {idle}\n")
            if "flood" in options.faults:
                stream.write(f"\n[route:flood]\nbind = 127.0.0.1:0\n"
                             f"destinations = {destinations[-1]}\n"
                             f"max-connections = {workers}\nmax-queued = 0\n"
                             f"backlog = 65535\n")
    process = fleet.start("gconn", [sys.executable, "-m", "gconn", "-c", path])
    wait_for_line(process, "ready workers=")
    line = wait_for_line(process, "listening route=")[0]
    target = line.split("address=", 1)[1].split()[0]
    return process, target, access_log


def route_address(process, route):
    """Where gconn's ``route`` listens, from its log."""
    line = wait_for_line(process, f"listening route={route} ")[0]
    return line.split("address=", 1)[1].split()[0]


class TreeProbe:
    """Reads resident memory, CPU seconds and descriptors over processes and their children."""

    def __init__(self, pids):
        import psutil
        self.psutil = psutil
        self.roots = [psutil.Process(pid) for pid in pids]

    def alive(self):
        return all(root.is_running() and root.status() != self.psutil.STATUS_ZOMBIE
                   for root in self.roots)

    def sample(self):
        """{'rss': bytes, 'cpu': seconds, 'fds': count, 'processes': n} over the trees."""
        totals = {"rss": 0, "cpu": 0.0, "fds": 0, "processes": 0}
        try:
            tree = [p for root in self.roots for p in (root, *root.children(recursive=True))]
        except self.psutil.NoSuchProcess:
            return None
        for process in tree:
            try:
                with process.oneshot():
                    totals["rss"] += process.memory_info().rss
                    times = process.cpu_times()
                    totals["cpu"] += times.user + times.system
                    totals["fds"] += open_descriptors(process.pid)
                    totals["processes"] += 1
            except (self.psutil.NoSuchProcess, self.psutil.ZombieProcess, OSError):
                continue
        return totals


def start_clients(fleet, options, targets, duration=None, interval=None):
    """Start the client processes; return them (each writes JSON lines to its stdout)."""
    duration = options.duration if duration is None else duration
    interval = options.interval if interval is None else interval
    count = max(1, math.ceil(options.clients / options.clients_per_process))
    processes = []
    for index in range(count):
        share = options.clients // count + (1 if index < options.clients % count else 0)
        args = [sys.executable, "-m", "gconn_tools.soak_client", "--target", ",".join(targets),
                "--clients", str(share), "--rate", str(options.rate / count),
                "--duration", str(duration), "--interval", str(interval),
                "--payload", str(options.payload), "--churn", str(options.churn),
                "--index", str(index), "--late-after", str(options.late_after),
                "--drain", str(options.drain)]
        process = fleet.start(f"clients{index}-{len(fleet.processes)}", args,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
        os.set_blocking(process.stdout.fileno(), False)
        process.buffer = ""
        process.latest = {}
        process.windows = []  # window histograms of the lines read since the last sample
        process.ramped = None  # seconds this process took to connect all its clients
        processes.append(process)
    return processes


def read_reports(clients):
    """Take every complete JSON line the clients have written; keep each one's latest."""
    for process in clients:
        try:
            chunk = process.stdout.read()
        except (TypeError, OSError):
            chunk = None
        if chunk:
            process.buffer += chunk
            *complete, process.buffer = process.buffer.split("\n")
            for line in complete:
                if line.startswith("{"):
                    report = json.loads(line)
                    if "ramped" in report:
                        process.ramped = report["ramped"]
                    else:
                        process.latest = report
                        process.windows.append((report["window_rtt"], report["window_lag"]))


# histograms ------------------------------------------------------------------------------------

def merge(histograms):
    """One histogram ({"counts": {bucket: n}, "max": s}) from several."""
    counts = collections.Counter()
    maximum = 0.0
    for histogram in histograms:
        for key, count in histogram["counts"].items():
            counts[int(key)] += count
        maximum = max(maximum, histogram["max"])
    return {"counts": counts, "max": maximum}


def quantile(histogram, fraction):
    """The value below which ``fraction`` of the histogram's samples lie (about 5 % precise),
    in seconds; None when it is empty."""
    counts = histogram["counts"]
    total = sum(counts.values())
    if not total:
        return None
    rank, seen = max(1, math.ceil(fraction * total)), 0
    for key in sorted(counts, key=int):
        seen += counts[key]
        if seen >= rank:
            return min(bucket_value(int(key)), histogram["max"])
    return histogram["max"]


def milliseconds(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


def summary_ms(histogram):
    return {"p50": milliseconds(quantile(histogram, 0.5)),
            "p99": milliseconds(quantile(histogram, 0.99)),
            "max": milliseconds(histogram["max"] or None)}


COUNTS = ("connected", "open", "echoes_sent", "echoes_verified", "bytes_verified", "late",
          "lost", "corrupted", "cut", "cut_in_flight")


def combine(clients):
    """Sum the clients' latest reports into one."""
    total = {key: 0 for key in COUNTS}
    total.update(failed=collections.Counter(), cut_seen=collections.Counter(), cuts=[],
                 cpu=0.0, done=True, by_second=collections.defaultdict(collections.Counter))
    histograms = collections.defaultdict(list)
    for process in clients:
        report = process.latest
        if not report:
            total["done"] = False
            continue
        for key in COUNTS:
            total[key] += report.get(key, 0)
        total["failed"].update(report["failed"])
        total["cut_seen"].update(report["cut_seen"])
        total["cuts"].extend(report["cuts"])
        for kind, counts in report.get("by_second", {}).items():
            total["by_second"][kind].update({int(k): v for k, v in counts.items()})
        total["cpu"] += report["cpu"]
        for key in ("rtt", "late_delay", "connect", "lag"):
            histograms[key].append(report[key])
        total["done"] = total["done"] and report["done"]
    for key in ("rtt", "late_delay", "connect", "lag"):
        total[key] = merge(histograms[key])
    total["per_process"] = [
        {"clients_process": index, "lag_ms": summary_ms(merge([p.latest["lag"]])),
         "cpu_seconds": p.latest["cpu"]}
        for index, p in enumerate(clients) if p.latest]
    return total


def take_windows(clients):
    """The echo RTT and loop lag histograms of every line read since the last call."""
    rtt, lag = [], []
    for process in clients:
        for window_rtt, window_lag in process.windows:
            rtt.append(window_rtt)
            lag.append(window_lag)
        process.windows = []
    return merge(rtt), merge(lag)


# the run ---------------------------------------------------------------------------------------

class Progress:
    """A progress bar on a terminal (tqdm), plain lines otherwise."""

    def __init__(self, options, label):
        self.options, self.label = options, label
        self.bar = None
        self.stage = None
        self.next_line = 0.0
        self.terminal = sys.stdout.isatty()

    def update(self, elapsed, total, window_p99, lag_p99, hold_elapsed):
        clients = self.options.clients
        failed = sum(total["failed"].values())
        details = (f"failed {failed} echoes {total['echoes_verified']} late {total['late']} "
                   f"lost {total['lost']} cut {total['cut']} p99 {window_p99} ms "
                   f"lag p99 {lag_p99} ms")
        if not self.terminal:
            now = time.monotonic()
            if now >= self.next_line:
                self.next_line = now + PROGRESS_EVERY
                print(f"  {self.label} t={elapsed:6.1f}s connected {total['open']:>6}/{clients} "
                      + details, flush=True)
            return
        from tqdm import tqdm
        stage = "ramp" if hold_elapsed is None else "hold"
        if stage != self.stage:
            if self.bar is not None:  # the ramp is over: every client connected or failed
                self.bar.n = self.bar.total
                self.bar.refresh()
            self.close()
            self.stage = stage
            total_units = clients if stage == "ramp" else self.options.duration
            unit = "conn" if stage == "ramp" else "s"
            self.bar = tqdm(total=total_units, unit=unit, desc=f"{self.label} {stage}",
                            dynamic_ncols=True, leave=True)
        self.bar.n = total["open"] if stage == "ramp" else min(self.options.duration,
                                                               round(hold_elapsed, 1))
        self.bar.set_postfix_str(f"open {total['open']} " + details, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_phase(fleet, options, label, targets, probe, echo_probe, started, injector=None):
    """Run the clients once against ``targets``, with ``injector``'s faults once they all
    connected; return what they and the probes saw."""
    cpu_self = resource.getrusage(resource.RUSAGE_SELF)
    phase_started = time.monotonic()
    gconn_before = probe.sample() if probe else None
    echo_before = echo_probe.sample() if echo_probe else None
    clients = start_clients(fleet, options, targets)
    progress = Progress(options, label)
    timeline, peak, peak_open, gconn_died = [], None, 0, False
    hold_started = None
    try:
        while any(process.poll() is None for process in clients):
            time.sleep(SAMPLE_EVERY)  # sampling period of the progress and the probes
            read_reports(clients)
            total = combine(clients)
            sample = None
            if probe:
                sample = probe.sample()
                if gconn_died or not probe.alive() or sample is None:
                    if not gconn_died:
                        print("gconn-soak: gconn died mid-run", flush=True)
                    gconn_died = True
                elif peak is None or sample["fds"] > peak["fds"]:
                    peak = sample
            peak_open = max(peak_open, total["open"])
            if hold_started is None and all(p.ramped is not None for p in clients):
                hold_started = time.monotonic()
                if injector is not None:
                    injector.start(clients)
            if injector is not None and hold_started is not None:
                injector.step(None if gconn_died else sample)
            window_rtt, window_lag = take_windows(clients)
            now = time.monotonic()
            point = {"t": round(now - started, 1), "phase": label, "open": total["open"],
                     "p99_ms": milliseconds(quantile(window_rtt, 0.99)),
                     "lag_p99_ms": milliseconds(quantile(window_lag, 0.99))}
            if sample and not gconn_died:
                point.update(rss_mb=round(sample["rss"] / 2**20, 1), fds=sample["fds"])
            point["cpu"] = cpu_used(total, sample if not gconn_died else None, gconn_before,
                                    echo_probe, echo_before, cpu_self)
            point["echoes"] = total["echoes_sent"]
            point["hold"] = hold_started is not None
            timeline.append(point)
            progress.update(now - phase_started, total, point["p99_ms"], point["lag_p99_ms"],
                            None if hold_started is None else now - hold_started)
    finally:
        progress.close()
        if injector is not None:
            injector.stop()
    read_reports(clients)
    total = combine(clients)
    ramps = [process.ramped for process in clients]
    ramp = max(ramps) if all(r is not None for r in ramps) else None
    gconn_after = probe.sample() if probe and not gconn_died else None
    return {
        "label": label, "total": total, "timeline": timeline, "peak": peak,
        "peak_open": peak_open, "gconn_died": gconn_died, "ramp": ramp,
        "wall": time.monotonic() - phase_started,
        "cpu": cpu_used(total, gconn_after, gconn_before, echo_probe, echo_before, cpu_self)}


def cpu_used(total, gconn_now, gconn_before, echo_probe, echo_before, soak_before):
    """CPU seconds used since the phase began by gconn, the clients, the echo destinations and
    this process (None where not measured)."""
    echo_now = echo_probe.sample() if echo_probe else None
    soak_now = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "gconn": None if gconn_now is None or gconn_before is None
        else round(gconn_now["cpu"] - gconn_before["cpu"], 3),
        "clients": round(total["cpu"], 3),
        "echo": None if echo_now is None or echo_before is None
        else round(echo_now["cpu"] - echo_before["cpu"], 3),
        "soak": round(soak_now.ru_utime + soak_now.ru_stime
                      - soak_before.ru_utime - soak_before.ru_stime, 3)}


def run(options):
    """The whole soak; returns (report, exit code)."""
    fleet = Fleet()
    gconn = probe = echo_probe = access_log = injector = None
    started = time.monotonic()
    baseline_phase = None
    if options.target:
        target = options.target
    else:
        destinations = []
        if not options.config:
            echoes, destinations = start_echoes(fleet, options)
            echo_probe = TreeProbe([process.pid for process in echoes])
        if options.baseline:
            print(f"gconn-soak: baseline: {options.clients} clients straight to the echo "
                  f"destinations (no gconn)", flush=True)
            baseline_phase = run_phase(fleet, options, "direct", destinations, None,
                                       echo_probe, started)
        gconn, target, access_log = start_gconn(fleet, options, destinations)
        if options.faults:
            target = route_address(gconn, "soak")
            flood = route_address(gconn, "flood") if "flood" in options.faults else None
            injector = soak_faults.Injector(fleet, options, gconn, echoes, target, flood)
        probe = TreeProbe([gconn.pid])
        print(f"gconn-soak: gconn pid={gconn.pid} target={target} "
              f"workers={len(probe.roots[0].children())}", flush=True)
    baseline = probe.sample() if probe else None
    phase = run_phase(fleet, options, "gconn", [target], probe, echo_probe, started, injector)
    if injector is not None:
        phase["faults"] = injector.results(phase["total"]["by_second"], phase["timeline"],
                                           started, access_log, gconn.log_path)
    gconn_died = phase["gconn_died"]
    settled = after = None
    if probe and not gconn_died:
        settled, after = settle(probe, baseline)
    # before the second wave, whose connections reuse the clients' addresses and ports
    ends = read_access_log(access_log) if phase["total"]["cut"] else {}
    if probe and not gconn_died:
        if settled and options.second_wave:
            print("gconn-soak: second wave (connect all, close at once) for the leak check",
                  flush=True)
            wave = start_clients(fleet, options, [target], duration=0.0, interval=3600.0)
            while any(process.poll() is None for process in wave):
                time.sleep(SAMPLE_EVERY)  # waiting for the wave; its reports are drained
                read_reports(wave)
            settled, second = settle(probe, baseline)
            after = dict(after, second_rss=second["rss"] if second else None,
                         cpu=second["cpu"] if second else after["cpu"])
        gconn_died = not probe.alive()
    phase["gconn_died"] = gconn_died
    report = build_report(options, target, phase, baseline, after, settled, baseline_phase, ends)
    fleet.stop_all()
    return report, verdict(report, options)


def settle(probe, baseline):
    """Wait until gconn's descriptors are back to baseline, then for its workers to trim
    (once a second after a wave); return (descriptors back, last sample)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        sample = probe.sample()
        if sample is None:
            return False, None
        if sample["fds"] <= baseline["fds"]:
            time.sleep(RSS_SETTLE)  # letting the workers' heartbeat trim freed memory
            return True, probe.sample() or sample
        if time.monotonic() > deadline:
            return False, sample
        time.sleep(0.2)  # polling descriptor counts until they return


def read_access_log(path):
    """client address -> (end, error) from gconn's access log (None when not ours)."""
    if not path or not os.path.exists(path):
        return None
    ends = {}
    with open(path, errors="replace") as stream:
        for line in stream:
            fields = parse_fields(line)
            if "client" in fields:
                ends[fields["client"]] = (fields.get("end"), fields.get("error"))
    return ends


def memory_stable(after, peak, baseline):
    """Whether a second wave of the same clients left RSS where the first left it: memory
    kept after the first wave is the allocators' reuse pool, memory that grows again is a
    leak."""
    if after.get("second_rss") is None:
        return None
    growth = max(0, peak["rss"] - baseline["rss"])
    return after["second_rss"] - after["rss"] <= max(RSS_REGROWTH * growth,
                                                      RSS_NOISE * after["processes"])


def outcome(options, phase):
    """The client-side figures of one phase."""
    total = phase["total"]
    ramp = phase["ramp"]
    cpu = phase["cpu"]
    harness = sum(v for k, v in cpu.items() if k != "gconn" and v is not None)
    available = (os.cpu_count() or 1) * phase["wall"]
    used = sum(v for v in cpu.values() if v is not None)
    result = {
        "peak_concurrent": phase["peak_open"], "connected_total": total["connected"],
        "connect_failures": dict(total["failed"]), "echoes_sent": total["echoes_sent"],
        "echoes_verified": total["echoes_verified"], "bytes_verified": total["bytes_verified"],
        "late": total["late"], "lost": total["lost"], "corrupted": total["corrupted"],
        "cut": total["cut"],
        "late_delay_ms": summary_ms(total["late_delay"]),
        "connect_ms": summary_ms(total["connect"]),
        "echo_rtt_ms": summary_ms(total["rtt"]),
        "ramp_s": None if ramp is None else round(ramp, 2),
        "connect_rate_per_s": None if not ramp else round(options.clients / ramp),
        "harness": {
            "lag_ms": summary_ms(total["lag"]),
            "per_process": total["per_process"],
            "cpu_seconds": {key: None if value is None else round(value, 2)
                            for key, value in cpu.items() if key != "gconn"},
            "cpu_per_echo_us": round(harness / total["echoes_sent"] * 1e6, 1)
            if total["echoes_sent"] else None},
        "cpu_share": {"available_cpu_seconds": round(available, 1),
                      "gconn": None if cpu["gconn"] is None
                      else round(cpu["gconn"] / available, 3),
                      "harness": round(harness / available, 3)},
        "cpu_per_echo_in_hold_us": hold_costs(phase["timeline"]),
    }
    result["saturated_s"] = saturated_seconds(phase["timeline"])
    result["machine_saturated"] = used / available > SATURATED or result["saturated_s"] >= 2
    return result


def saturated_seconds(timeline):
    """Seconds of the phase in which gconn and the harness together kept the machine's CPUs
    over SATURATED busy (then latencies include waiting for a CPU)."""
    cores = os.cpu_count() or 1
    return round(sum(after["t"] - before["t"] for before, after in itertools.pairwise(timeline)
                     if cores_used(before, after, CPU_PARTS) > SATURATED * cores), 1)


def hold_costs(timeline):
    """CPU microseconds per echo of each part while every client was connected (the ramp's
    connects left out), from the timeline's first and last samples of the hold."""
    hold = [point for point in timeline if point["hold"]]
    if len(hold) < 2 or hold[-1]["echoes"] <= hold[0]["echoes"]:
        return None
    echoes = hold[-1]["echoes"] - hold[0]["echoes"]
    return {key: None if hold[-1]["cpu"][key] is None or hold[0]["cpu"][key] is None
            else round((hold[-1]["cpu"][key] - hold[0]["cpu"][key]) / echoes * 1e6, 1)
            for key in hold[-1]["cpu"]}


def build_report(options, target, phase, baseline, after, settled, baseline_phase, ends):
    """The final report as a dict (also the JSON file)."""
    report = {"target": target, "clients": options.clients, "duration_s": options.duration,
              "interval_s": options.interval, "payload_bytes": options.payload,
              "late_after_s": options.late_after}
    report.update(outcome(options, phase))
    total = phase["total"]
    cuts = []
    reasons = collections.Counter()
    for cut in total["cuts"]:
        end, error = (ends or {}).get(cut["client"], (None, None))
        if ends is None:
            end = "unknown (gconn's access log is not the soak's)"
        elif end is None:
            end = "no access-log line"
        reasons[end] += 1
        cuts.append(dict(cut, end=end, error=error))
    report["cut_seen"] = dict(total["cut_seen"])
    report["cut_end_reasons"] = dict(reasons)  # of the cuts listed (up to 500 per process)
    report["cut_listed"] = len(cuts)
    report["cut_connections"] = cuts[:CUTS_REPORTED]
    report["cut_echoes_in_flight"] = total["cut_in_flight"]
    report["gconn_died"] = phase["gconn_died"]
    if "faults" in phase:
        report["faults"] = phase["faults"]
    report["timeline"] = (baseline_phase["timeline"] if baseline_phase else []) + phase["timeline"]
    peak = phase["peak"]
    if baseline and peak:
        growth = peak["rss"] - baseline["rss"]
        report["gconn"] = {
            "processes": peak["processes"],
            "rss_baseline_mb": round(baseline["rss"] / 2**20, 1),
            "rss_peak_mb": round(peak["rss"] / 2**20, 1),
            "rss_per_connection_kb": round(growth / max(1, phase["peak_open"]) / 1024, 2),
            "cpu_seconds": round(peak["cpu"] - baseline["cpu"], 2),
            "cpu_seconds_run": None if phase["cpu"]["gconn"] is None
            else round(phase["cpu"]["gconn"], 2),
            "fds_baseline": baseline["fds"], "fds_peak": peak["fds"],
        }
        if after:
            kept = (after["rss"] - baseline["rss"]) / growth if growth > 0 else 0.0
            second = after.get("second_rss")
            report["gconn"].update({
                "fds_after": after["fds"], "rss_after_mb": round(after["rss"] / 2**20, 1),
                "rss_growth_kept": round(kept, 3),
                "rss_after_second_wave_mb": None if second is None else round(second / 2**20, 1),
                "cpu_seconds_total": round(after["cpu"] - baseline["cpu"], 2)})
            # a reload or a killed worker replaced processes that held the first wave: the
            # second wave then fills fresh workers, whose growth says nothing of a leak
            replaced = {"reload", "kill-worker"} & set(options.faults)
            stable = None if replaced else memory_stable(after, peak, baseline)
            report["leak_check"] = {
                "descriptors_returned": bool(settled), "rss_stable_over_second_wave": stable,
                "passed": bool(settled) and stable is not False}
            if replaced:
                report["leak_check"]["rss_not_judged"] = (
                    f"{' and '.join(sorted(replaced))} replaced the workers that held the "
                    f"first wave")
    if baseline_phase:
        direct = outcome(options, baseline_phase)
        report["baseline"] = direct
        report["baseline"]["added_latency_ms"] = compare(direct, report)
    lag_p99 = report["harness"]["lag_ms"]["p99"]
    report["harness_bottleneck"] = lag_p99 is not None and lag_p99 > options.max_lag
    return report


def compare(direct, through):
    """gconn's added latency and its connect-rate ratio, from the two phases of one run."""
    result = {}
    for key in ("p50", "p99"):
        before, after = direct["echo_rtt_ms"][key], through["echo_rtt_ms"][key]
        result[key] = None if before is None or after is None else round(after - before, 3)
        result[f"{key}_ratio"] = None if not before or after is None else round(after / before, 2)
    before, after = direct["connect_rate_per_s"], through["connect_rate_per_s"]
    result["connect_rate_ratio"] = None if not before or not after else round(after / before, 2)
    return result


def verdict(report, options):
    """0 when nothing was lost, corrupted or cut, late echoes, failures are within bounds and
    nothing leaked."""
    problems = []
    faults = report.get("faults")
    if report["lost"] or report["corrupted"]:
        problems.append(f"{report['lost']} lost, {report['corrupted']} corrupted echoes")
    if faults is not None:  # cuts and late echoes are judged fault by fault
        problems += soak_faults.problems(faults)
    elif report["cut"]:
        reasons = ", ".join(f"{count} {reason}" for reason, count in
                            report["cut_end_reasons"].items())
        problems.append(f"{report['cut']} connections cut (of {report['cut_listed']} "
                        f"listed: {reasons})")
    if faults is None and report["echoes_sent"] and \
            report["late"] * 100 / report["echoes_sent"] > options.max_late:
        problems.append(f"{report['late']} late echoes (over {options.max_late:g} % of "
                        f"{report['echoes_sent']}; slowest {report['late_delay_ms']['max']} ms)")
    failures = sum(report["connect_failures"].values())
    if failures > options.max_failures:
        problems.append(f"{failures} connect failures (allowed {options.max_failures})")
    if report["gconn_died"]:
        problems.append("gconn died during the run")
    if report.get("leak_check") and not report["leak_check"]["passed"]:
        problems.append("gconn did not return to its baseline (leak check)")
    if report["echoes_verified"] == 0 and options.duration > 0:
        problems.append("no echo was verified")
    report["problems"] = problems
    report["passed"] = not problems
    return 0 if not problems else 1


def print_table(report, options):
    def ms(figures):
        return " / ".join(str(figures[key]) for key in ("p50", "p99", "max"))

    harness = report["harness"]
    share = report["cpu_share"]
    cpu = harness["cpu_seconds"]
    rows = [("target / peak concurrent", f"{report['clients']} / {report['peak_concurrent']}"),
            ("connected in all", report["connected_total"]),
            ("ramp seconds / connections per s", f"{report['ramp_s']} / "
                                                 f"{report['connect_rate_per_s']}"),
            ("connect failures", report["connect_failures"] or 0),
            ("echoes sent / verified", f"{report['echoes_sent']} / {report['echoes_verified']}"),
            ("bytes verified", report["bytes_verified"]),
            ("lost / corrupted / cut", f"{report['lost']} / {report['corrupted']} / "
                                       f"{report['cut']}"),
            (f"late (over {report['late_after_s']:g} s)",
             f"{report['late']}" + (f", delay ms p50 / p99 / max {ms(report['late_delay_ms'])}"
                                    if report["late"] else "")),
            ("connect ms p50 / p99 / max", ms(report["connect_ms"])),
            ("echo RTT ms p50 / p99 / max", ms(report["echo_rtt_ms"]))]
    if report["cut"]:
        rows.append(("cut: client saw / gconn logged",
                     f"{report['cut_seen']} / {report['cut_end_reasons']} (of "
                     f"{report['cut_listed']} listed)"))
    baseline = report.get("baseline")
    if baseline:
        added = baseline["added_latency_ms"]
        rows += [("direct echo RTT ms p50 / p99 / max", ms(baseline["echo_rtt_ms"])),
                 ("gconn adds ms p50 / p99", f"{added['p50']} ({added['p50_ratio']}x) / "
                                             f"{added['p99']} ({added['p99_ratio']}x)"),
                 ("connects per s direct / gconn", f"{baseline['connect_rate_per_s']} / "
                                                   f"{report['connect_rate_per_s']} "
                                                   f"({added['connect_rate_ratio']}x)")]
    rows += [("harness loop lag ms p50 / p99 / max", ms(harness["lag_ms"])),
             ("CPU s gconn / clients / echo / soak",
              f"{report.get('gconn', {}).get('cpu_seconds_run')} / {cpu['clients']} / "
              f"{cpu['echo']} / {cpu['soak']}"),
             ("CPU share gconn / harness", f"{share['gconn']} / {share['harness']} of "
                                           f"{share['available_cpu_seconds']} CPU-s"),
             ("harness CPU per echo us", harness["cpu_per_echo_us"])]
    hold = report["cpu_per_echo_in_hold_us"]
    if hold:
        rows.append(("hold CPU us per echo gconn / clients / echo / soak",
                     " / ".join(str(hold[key]) for key in ("gconn", "clients", "echo", "soak"))))
    gconn = report.get("gconn")
    if gconn:
        rows += [("gconn processes", gconn["processes"]),
                 ("gconn RSS baseline / peak MB", f"{gconn['rss_baseline_mb']} / "
                                                  f"{gconn['rss_peak_mb']}"),
                 ("gconn RSS per connection KB", gconn["rss_per_connection_kb"]),
                 ("gconn CPU seconds, run and leak check",
                  gconn.get("cpu_seconds_total", gconn["cpu_seconds"])),
                 ("gconn descriptors base / peak / after",
                  f"{gconn['fds_baseline']} / {gconn['fds_peak']} / {gconn.get('fds_after')}"),
                 ("gconn RSS after wave / second wave MB",
                  f"{gconn.get('rss_after_mb')} / {gconn.get('rss_after_second_wave_mb')}")]
    rows += soak_faults.table(report.get("faults") or [])
    if report.get("leak_check"):
        rows.append(("leak check", "passed" if report["leak_check"]["passed"] else
                     f"FAILED {report['leak_check']}"))
    rows.append(("result", "PASSED" if report["passed"] else
                 "FAILED: " + "; ".join(report["problems"])))
    width = max(len(name) for name, _ in rows)
    print("\ngconn-soak report")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    if report["machine_saturated"] and not report["harness_bottleneck"]:
        print(f"warning: the machine's CPUs were saturated for {report['saturated_s']} s "
              f"(over the run gconn used {share['gconn']}, the harness {share['harness']} of "
              f"{share['available_cpu_seconds']} CPU-s), so latencies then include waiting for "
              f"a CPU; use a lower --rate, fewer clients, a longer --interval, or run the "
              f"clients on another machine with --target")
    if report["harness_bottleneck"]:
        print(f"warning: the harness, not gconn, is the bottleneck: client loop lag p99 "
              f"{harness['lag_ms']['p99']} ms (over {options.max_lag:g} ms), so latencies "
              f"include the clients' own queueing; use fewer --clients-per-process, a longer "
              f"--interval, or run the clients on another machine with --target")


def load_pyplot(tool):
    """matplotlib's pyplot on a file backend, or None (said once) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        print(f"{tool}: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return None
    return pyplot


def plot(report, path):
    """One PNG over the run's seconds: concurrency, echo p99 (direct and through gconn),
    harness lag, gconn's RSS and descriptors, and the CPU cores gconn and the harness kept
    busy (so that a latency rise can be told from a saturated machine)."""
    plt = load_pyplot("gconn-soak")
    if plt is None:
        return
    timeline = report["timeline"]
    figure, axes = plt.subplots(5, 1, figsize=(9, 12), sharex=True)
    for phase, style in (("direct", "--"), ("gconn", "-")):
        points = [p for p in timeline if p["phase"] == phase]
        if not points:
            continue
        times = [p["t"] for p in points]
        axes[0].plot(times, [p["open"] for p in points], style, color="tab:blue",
                     label=f"{phase}")
        way = "straight to the echo" if phase == "direct" else "through gconn"
        axes[1].plot(times, [p["p99_ms"] for p in points], style, color="tab:red",
                     label=f"echo p99, {way}")
        axes[2].plot(times, [p["lag_p99_ms"] for p in points], style, color="tab:purple",
                     label=f"client loop lag p99 ({phase})")
        pairs = list(itertools.pairwise(points))
        for parts, label, color in ((("gconn",), "gconn", "tab:blue"),
                                    (CPU_PARTS, "gconn + harness", "tab:brown")):
            axes[4].plot([b["t"] for _, b in pairs], [cores_used(a, b, parts) for a, b in pairs],
                         style, color=color, label=f"{label} ({phase})")
        if phase == "gconn":
            axes[3].plot(times, [p.get("rss_mb") for p in points], color="tab:green",
                         label="gconn RSS MB")
            right = axes[3].twinx()
            right.plot(times, [p.get("fds") for p in points], color="tab:orange",
                       label="gconn descriptors")
            right.set_ylabel("descriptors", color="tab:orange")
    axes[0].set_ylabel("connections open")
    axes[1].set_ylabel("echo p99 ms (log)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("harness lag ms")
    axes[3].set_ylabel("RSS MB", color="tab:green")
    axes[4].axhline(os.cpu_count() or 1, color="grey", linewidth=0.8, linestyle=":",
                    label="all cores")
    axes[4].set_ylabel("CPU cores used")
    axes[4].set_xlabel("seconds since start")
    axes[4].legend(loc="upper left", fontsize="small")
    axes[1].axhline(report["late_after_s"] * 1000, color="grey", linewidth=0.8, linestyle=":",
                    label="late after")
    for axis in axes[:3]:
        axis.legend(loc="upper left", fontsize="small")
    verdict_text = "PASSED" if report["passed"] else "FAILED"
    axes[0].set_title(f"gconn-soak: {report['clients']} clients, interval "
                      f"{report['interval_s']:g} s: {verdict_text} (lost {report['lost']}, "
                      f"corrupted {report['corrupted']}, cut {report['cut']}, "
                      f"late {report['late']})")
    figure.tight_layout()
    figure.savefig(path)


def cores_used(before, after, parts):
    """CPU cores ``parts`` (keys of a timeline point's cpu) kept busy between two points."""
    used = sum((after["cpu"][key] or 0) - (before["cpu"][key] or 0) for key in parts)
    return used / (after["t"] - before["t"]) if after["t"] > before["t"] else 0.0


def main(argv=None):
    """The ``gconn-soak`` command."""
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        report, code = run(options)
    except KeyboardInterrupt:
        print("gconn-soak: interrupted; stopped every process it started", file=sys.stderr)
        return 130
    print_table(report, options)
    if options.json:
        with open(options.json, "w") as stream:
            json.dump(report, stream, indent=2)
    if options.plot:
        plot(report, options.plot)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
