"""gconn-soak: open many client connections through gconn, keep them busy with verified echoes,
and report what happened, with gconn's memory and descriptors per connection and a leak check.

By default it starts what it needs: gconn-echo destination processes (several ports, since
ephemeral ports run out at about 28,000 per source and destination), a gconn with a generated
config and enough workers for the descriptor limit, and client processes (each a gevent pool,
source addresses spread over 127.0.0.x with IP_BIND_ADDRESS_NO_PORT).  ``--target`` soaks a
router that is already running; ``--config`` starts gconn with the user's config.

Every echo carries a sequence number and a CRC-32 and must come back byte for byte; lost or
corrupted echoes, failures over ``--max-failures``, gconn dying, or gconn not returning to its
baseline after the clients leave all make the exit code non-zero.  Every process it starts is
in a process group of its own and is stopped on exit, Ctrl-C included.
"""

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where tools/ lives
CLIENTS_PER_PROCESS = 15_000  # client sockets per client process (limit 20,000 descriptors)
CONNECTIONS_PER_ECHO_PORT = 20_000  # below the ~28,000 ephemeral ports per source/destination
CONNECTIONS_PER_ECHO_PROCESS = 15_000  # echo sockets per echo process
WORKER_HEADROOM = 1.25  # gconn workers for this many times the clients (accepts spread unevenly)
DESCRIPTOR_RESERVE = 64  # as gconn.sockets: descriptors a worker keeps for itself
READY_TIMEOUT = 60.0  # seconds to wait for a started process to say it is ready
SETTLE_TIMEOUT = 60.0  # seconds gconn may take to return to baseline after the clients leave
RSS_REGROWTH = 0.1  # a second wave may grow RSS by this share of the first wave's growth
RSS_NOISE = 2 * 2**20  # bytes per gconn process of growth that are allocator noise
RSS_SETTLE = 2.5  # seconds after the descriptors return for the workers to trim memory
PROGRESS_EVERY = 2.0  # seconds between progress lines
SAMPLE_EVERY = 1.0  # seconds between samples of gconn's memory and descriptors (cheap enough
# for 50,000 connections: num_fds lists /proc/PID/fd of every worker)


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
    parser.add_argument("--max-failures", type=int, default=0,
                        help="connect failures tolerated before the run fails")
    parser.add_argument("--target", metavar="HOST:PORT",
                        help="soak this running router instead of starting one")
    parser.add_argument("--config", metavar="FILE",
                        help="start gconn with this config (its first route is soaked)")
    parser.add_argument("--workers", type=int, default=0,
                        help="gconn workers to start (0: enough for the descriptor limit)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON here")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw concurrency and p99 over time (needs matplotlib)")
    parser.add_argument("--no-second-wave", dest="second_wave", action="store_false",
                        help="skip the leak check's second wave (connect all, close at once)")
    parser.add_argument("--echo-args", default="", help=argparse.SUPPRESS)  # tests: bad echo
    options = parser.parse_args(argv)
    if options.clients < 1 or options.rate <= 0 or options.duration < 0 or options.payload < 0:
        parser.error("--clients and --rate must be positive, --duration and --payload >= 0")
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
    """Start enough gconn-echo processes and ports; return their addresses."""
    processes = max(1, math.ceil(options.clients / CONNECTIONS_PER_ECHO_PROCESS))
    ports = max(processes, math.ceil(options.clients / CONNECTIONS_PER_ECHO_PORT) + 1)
    per_process = math.ceil(ports / processes)
    addresses = []
    for index in range(processes):
        binds = [arg for _ in range(per_process) for arg in ("--bind", "127.0.0.1:0")]
        process = fleet.start(f"echo{index}", [sys.executable, "-m", "gconn.echo", *binds,
                                               *options.echo_args.split()])
        for line in wait_for_line(process, "listening address=", count=per_process):
            addresses.append(line.split("address=", 1)[1])
    return addresses


def workers_for(clients):
    """gconn workers needed to hold ``clients`` forwarded connections with headroom."""
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_worker = (hard - DESCRIPTOR_RESERVE) // 2
    return max(1, math.ceil(clients * WORKER_HEADROOM / per_worker))


def start_gconn(fleet, options, destinations):
    """Start gconn with a generated config (or the user's); return (process, target)."""
    if options.config:
        path = options.config
    else:
        workers = options.workers or workers_for(options.clients)
        path = os.path.join(fleet.scratch, "soak.conf")
        with open(path, "w") as stream:
            stream.write(
                f"[gconn]\nworkers = {workers}\nlog-level = info\naccess-log = off\nadmin =\n"
                f"shutdown-timeout = 5s\n\n[route:soak]\nbind = 127.0.0.1:0\n"
                f"destinations = {', '.join(destinations)}\nstrategy = round-robin\n"
                f"max-connections = {options.clients * 2}\nbacklog = 65535\n"
                f"idle-timeout = 0\n")
    process = fleet.start("gconn", [sys.executable, "-m", "gconn", "-c", path])
    wait_for_line(process, "ready workers=")
    line = wait_for_line(process, "listening route=")[0]
    target = line.split("address=", 1)[1].split()[0]
    return process, target


class GconnProbe:
    """Reads gconn's resident memory, CPU seconds and descriptors over its process tree."""

    def __init__(self, pid):
        import psutil
        self.psutil = psutil
        self.root = psutil.Process(pid)

    def alive(self):
        return self.root.is_running() and self.root.status() != self.psutil.STATUS_ZOMBIE

    def sample(self):
        """{'rss': bytes, 'cpu': seconds, 'fds': count, 'processes': n} over the tree."""
        totals = {"rss": 0, "cpu": 0.0, "fds": 0, "processes": 0}
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except self.psutil.NoSuchProcess:
            return None
        for process in tree:
            try:
                with process.oneshot():
                    totals["rss"] += process.memory_info().rss
                    times = process.cpu_times()
                    totals["cpu"] += times.user + times.system
                    totals["fds"] += process.num_fds()
                    totals["processes"] += 1
            except (self.psutil.NoSuchProcess, self.psutil.ZombieProcess):
                continue
        return totals


def start_clients(fleet, options, target, duration=None, interval=None):
    """Start the client processes; return them (each writes JSON lines to its stdout)."""
    duration = options.duration if duration is None else duration
    interval = options.interval if interval is None else interval
    count = max(1, math.ceil(options.clients / CLIENTS_PER_PROCESS))
    processes = []
    for index in range(count):
        share = options.clients // count + (1 if index < options.clients % count else 0)
        args = [sys.executable, "-m", "gconn_tools.soak_client", "--target", target,
                "--clients", str(share), "--rate", str(options.rate / count),
                "--duration", str(duration), "--interval", str(interval),
                "--payload", str(options.payload), "--churn", str(options.churn),
                "--index", str(index)]
        process = fleet.start(f"clients{index}-{len(fleet.processes)}", args,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
        os.set_blocking(process.stdout.fileno(), False)
        process.buffer = ""
        process.latest = {}
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


def combine(clients):
    """Sum the clients' latest reports into one."""
    total = {"connected": 0, "open": 0, "failed": {}, "echoes_sent": 0, "echoes_verified": 0,
             "bytes_verified": 0, "lost": 0, "corrupted": 0, "rtt": [], "connect": [],
             "done": True}
    for process in clients:
        report = process.latest
        if not report:
            total["done"] = False
            continue
        for key in ("connected", "open", "echoes_sent", "echoes_verified", "bytes_verified",
                    "lost", "corrupted"):
            total[key] += report.get(key, 0)
        for reason, count in report.get("failed", {}).items():
            total["failed"][reason] = total["failed"].get(reason, 0) + count
        total["rtt"].extend(report.get("rtt", []))
        total["connect"].extend(report.get("connect", []))
        total["done"] = total["done"] and report.get("done", False)
    return total


def percentile(values, fraction):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def milliseconds(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


def run(options):
    """The whole soak; returns (report, exit code)."""
    fleet = Fleet()
    gconn = probe = None
    started = time.monotonic()
    if options.target:
        target = options.target
    else:
        destinations = [] if options.config else start_echoes(fleet, options)
        gconn, target = start_gconn(fleet, options, destinations)
        probe = GconnProbe(gconn.pid)
        print(f"gconn-soak: gconn pid={gconn.pid} target={target} "
              f"workers={len(probe.root.children())}", flush=True)
    baseline = probe.sample() if probe else None
    clients = start_clients(fleet, options, target)
    timeline, peak, peak_open, gconn_died = [], None, 0, False
    next_progress = time.monotonic()
    while any(process.poll() is None for process in clients):
        time.sleep(SAMPLE_EVERY)  # sampling period of the progress and gconn probes
        read_reports(clients)
        total = combine(clients)
        if probe:
            sample = probe.sample()
            if gconn.poll() is not None or sample is None:
                gconn_died = True
            elif peak is None or sample["fds"] > peak["fds"]:
                peak = sample
        peak_open = max(peak_open, total["open"])
        now = time.monotonic()
        if now >= next_progress:
            next_progress = now + PROGRESS_EVERY
            p99 = milliseconds(percentile(total["rtt"], 0.99))
            failed = sum(total["failed"].values())
            timeline.append({"t": round(now - started, 1), "open": total["open"],
                             "p99_ms": p99})
            print(f"  t={now - started:6.1f}s connected {total['open']:>6}/{options.clients} "
                  f"failed {failed} echoes {total['echoes_verified']} p99 {p99} ms", flush=True)
            if gconn_died:
                print("gconn-soak: gconn died mid-run", flush=True)
    read_reports(clients)
    total = combine(clients)
    settled = after = None
    if probe and not gconn_died:
        settled, after = settle(probe, baseline)
        if settled and options.second_wave:
            print("gconn-soak: second wave (connect all, close at once) for the leak check",
                  flush=True)
            wave = start_clients(fleet, options, target, duration=0.0, interval=3600.0)
            while any(process.poll() is None for process in wave):
                time.sleep(SAMPLE_EVERY)  # waiting for the wave; its reports are drained
                read_reports(wave)
            settled, second = settle(probe, baseline)
            after = dict(after, second_rss=second["rss"] if second else None)
        gconn_died = not probe.alive()
    ramps = [process.ramped for process in clients]
    ramp = max(ramps) if all(r is not None for r in ramps) else None
    report = build_report(options, target, total, peak_open, baseline, peak, after, settled,
                          gconn_died, timeline)
    report["ramp_s"] = None if ramp is None else round(ramp, 2)
    report["connect_rate_per_s"] = None if not ramp else round(options.clients / ramp)
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


def memory_stable(after, peak, baseline):
    """Whether a second wave of the same clients left RSS where the first left it: memory
    kept after the first wave is the allocators' reuse pool, memory that grows again is a
    leak."""
    if after.get("second_rss") is None:
        return None
    growth = max(0, peak["rss"] - baseline["rss"])
    return after["second_rss"] - after["rss"] <= max(RSS_REGROWTH * growth,
                                                      RSS_NOISE * after["processes"])


def build_report(options, target, total, peak_open, baseline, peak, after, settled, died,
                 timeline):
    """The final report as a dict (also the JSON file)."""
    report = {
        "target": target, "clients": options.clients, "duration_s": options.duration,
        "interval_s": options.interval, "payload_bytes": options.payload,
        "peak_concurrent": peak_open, "connected_total": total["connected"],
        "connect_failures": total["failed"], "echoes_sent": total["echoes_sent"],
        "echoes_verified": total["echoes_verified"], "bytes_verified": total["bytes_verified"],
        "lost": total["lost"], "corrupted": total["corrupted"],
        "connect_ms": {"p50": milliseconds(percentile(total["connect"], 0.5)),
                       "p99": milliseconds(percentile(total["connect"], 0.99))},
        "echo_rtt_ms": {"p50": milliseconds(percentile(total["rtt"], 0.5)),
                        "p99": milliseconds(percentile(total["rtt"], 0.99)),
                        "max": milliseconds(max(total["rtt"], default=None) or None)},
        "gconn_died": died, "timeline": timeline,
    }
    if baseline and peak:
        growth = peak["rss"] - baseline["rss"]
        report["gconn"] = {
            "processes": peak["processes"],
            "rss_baseline_mb": round(baseline["rss"] / 2**20, 1),
            "rss_peak_mb": round(peak["rss"] / 2**20, 1),
            "rss_per_connection_kb": round(growth / max(1, peak_open) / 1024, 2),
            "cpu_seconds": round(peak["cpu"] - baseline["cpu"], 2),
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
            stable = memory_stable(after, peak, baseline)
            report["leak_check"] = {
                "descriptors_returned": bool(settled), "rss_stable_over_second_wave": stable,
                "passed": bool(settled) and stable is not False}
    return report


def verdict(report, options):
    """0 when nothing was lost or corrupted, failures are within bounds and nothing leaked."""
    problems = []
    if report["lost"] or report["corrupted"]:
        problems.append(f"{report['lost']} lost, {report['corrupted']} corrupted echoes")
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


def print_table(report):
    rows = [("target / peak concurrent", f"{report['clients']} / {report['peak_concurrent']}"),
            ("connected in all", report["connected_total"]),
            ("ramp seconds / connections per s", f"{report.get('ramp_s')} / "
                                                 f"{report.get('connect_rate_per_s')}"),
            ("connect failures", report["connect_failures"] or 0),
            ("echoes sent / verified", f"{report['echoes_sent']} / {report['echoes_verified']}"),
            ("bytes verified", report["bytes_verified"]),
            ("lost / corrupted", f"{report['lost']} / {report['corrupted']}"),
            ("connect ms p50 / p99", f"{report['connect_ms']['p50']} / "
                                     f"{report['connect_ms']['p99']}"),
            ("echo RTT ms p50 / p99 / max", f"{report['echo_rtt_ms']['p50']} / "
                                            f"{report['echo_rtt_ms']['p99']} / "
                                            f"{report['echo_rtt_ms']['max']}")]
    gconn = report.get("gconn")
    if gconn:
        rows += [("gconn processes", gconn["processes"]),
                 ("gconn RSS baseline / peak MB", f"{gconn['rss_baseline_mb']} / "
                                                  f"{gconn['rss_peak_mb']}"),
                 ("gconn RSS per connection KB", gconn["rss_per_connection_kb"]),
                 ("gconn CPU seconds", gconn.get("cpu_seconds_total", gconn["cpu_seconds"])),
                 ("gconn descriptors base / peak / after",
                  f"{gconn['fds_baseline']} / {gconn['fds_peak']} / {gconn.get('fds_after')}"),
                 ("gconn RSS after wave / second wave MB",
                  f"{gconn.get('rss_after_mb')} / {gconn.get('rss_after_second_wave_mb')}")]
    if report.get("leak_check"):
        rows.append(("leak check", "passed" if report["leak_check"]["passed"] else
                     f"FAILED {report['leak_check']}"))
    rows.append(("result", "PASSED" if report["passed"] else
                 "FAILED: " + "; ".join(report["problems"])))
    width = max(len(name) for name, _ in rows)
    print("\ngconn-soak report")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")


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
    plt = load_pyplot("gconn-soak")
    if plt is None:
        return
    times = [point["t"] for point in report["timeline"]]
    figure, left = plt.subplots(figsize=(8, 4))
    left.plot(times, [p["open"] for p in report["timeline"]], color="tab:blue")
    left.set_xlabel("seconds")
    left.set_ylabel("concurrent connections", color="tab:blue")
    right = left.twinx()
    right.plot(times, [p["p99_ms"] or 0 for p in report["timeline"]], color="tab:red")
    right.set_ylabel("echo p99 ms", color="tab:red")
    figure.tight_layout()
    figure.savefig(path)


def main(argv=None):
    """The ``gconn-soak`` command."""
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        report, code = run(options)
    except KeyboardInterrupt:
        print("gconn-soak: interrupted; stopped every process it started", file=sys.stderr)
        return 130
    print_table(report)
    if options.json:
        with open(options.json, "w") as stream:
            json.dump(report, stream, indent=2)
    if options.plot:
        plot(report, options.plot)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
