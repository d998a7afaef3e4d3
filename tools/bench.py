"""gconn-bench: gconn side by side with HAProxy, nginx stream and the Python peers, as ratios.

Every proxy forwards one loopback port to the same backend with one worker pinned to CPU 0;
the backends (redis-server, iperf3 -s) and the load generators (redis-benchmark, iperf3,
gconn-soak's client) are pinned to CPU 1.  Peers are interleaved run by run so that drift hits
all alike, and each figure is the median of the runs.  Clients nobody here wrote produce the
figures: redis-benchmark (requests/s, p50/p99 at 50 and 1,000 clients, new connections/s with
-k 0) and iperf3 (1 and 8 streams); KB of proxy RSS per idle connection and the p99 ratio with
those idle connections held use gconn-soak's client.  A peer whose program is missing gets a
visible "not measured" row.  ``--quick`` runs a reduced set in well under 3 minutes.

    gconn-bench [--quick] [--peers noproxy,gconn,haproxy,...] [--json FILE] [--plot FILE.png]
"""

import argparse
import csv
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

from gconn_tools.soak import ROOT, Fleet, load_pyplot, wait_for_line

from gconn.docs import rewrite_between_markers

PEERS = ("noproxy", "gconn", "haproxy", "nginx", "uvloop", "asyncio", "gevent")
BEFORE = [None]  # --before: a checkout of an earlier gconn, measured as the gconn-before peer
PROXY_CPU, LOAD_CPU = "0", "1"  # the proxy's core and the load generator's and backend's
READY_TIMEOUT = 30.0  # seconds for a started program to accept connections
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
FULL = {"runs": 3, "requests": 200_000, "requests_1000": 200_000, "connections": 50_000,
        "seconds": 5, "idle": 8000}
QUICK = {"runs": 1, "requests": 20_000, "requests_1000": 20_000, "connections": 5_000,
         "seconds": 1, "idle": 500}
FIGURES = (  # key, heading, unit
    ("rps_50", "req/s c=50", ""), ("p99_50_ms", "p99 c=50", "ms"),
    ("req_per_cpu_s", "req per proxy-CPU-s", ""),
    ("rps_1000", "req/s c=1000", ""), ("p99_1000_ms", "p99 c=1000", "ms"),
    ("req_per_cpu_s_1000", "req per proxy-CPU-s c=1000", ""),
    ("conn_per_s", "new conn/s", ""), ("gbit_1", "1-stream Gbit/s", ""),
    ("gbit_8", "8-stream Gbit/s", ""), ("kb_per_idle", "KB/idle conn", ""),
    ("p99_idle_ratio", "p99 idle-held ratio", ""),
)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pinned(cpu, args):
    return ["taskset", "-c", cpu, *args]


def wait_port(port, process, timeout=READY_TIMEOUT):
    """Wait until 127.0.0.1:port accepts connections (or the process exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.name} exited ({process.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # polling a port until it listens
    raise RuntimeError(f"nothing listens on {port}")


def missing(peer):
    """Why ``peer`` cannot be measured here, or None."""
    need = {"haproxy": "haproxy", "nginx": "nginx"}.get(peer)
    if need and shutil.which(need) is None:
        return f"{need} not installed (apt-get install haproxy nginx-light libnginx-mod-stream)"
    if peer == "nginx" and not os.path.exists(NGINX_STREAM_MODULE):
        return "nginx stream module missing (apt-get install libnginx-mod-stream)"
    if peer == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "uvloop not installed (pip install uvloop)"
    return None


def gconn_command(port, target, *options):
    """``python -m gconn`` as the benchmarks run it: one worker, no admin, no access log, no
    idle timeout, from 127.0.0.1:port to 127.0.0.1:target."""
    return [sys.executable, "-m", "gconn", "--workers", "1", "--admin", "", "--access-log",
            "off", "--idle-timeout", "0", "--max-connections", "20000",
            "--max-connect-errors", "0", "--bind", f"127.0.0.1:{port}",
            "--destination", f"127.0.0.1:{target}", *options]


def haproxy_config(port, target, bind_options=""):
    """HAProxy's config as the benchmarks run it: one thread, 127.0.0.1:port to target.
    maxconn 9900: HAProxy refuses to start when maxconn needs more descriptors (two per
    connection) than this box's 20,000 limit; splice-auto with 64 pipes (gconn splices bulk
    streams too, through at most 16 pipes per worker)."""
    return (f"global\n  maxconn 9900\n  maxpipes 64\n  nbthread 1\n"
            f"defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n"
            f"  timeout client 1h\n  timeout server 1h\n"
            f"listen bench\n  bind 127.0.0.1:{port}{bind_options}\n"
            f"  server backend 127.0.0.1:{target}\n")


def start_peer(fleet, peer, target, tag):
    """Start ``peer`` forwarding a free port to 127.0.0.1:target; return (process, port)."""
    if peer == "noproxy":
        return None, target
    scratch = fleet.scratch
    port = free_port()
    name = f"{peer}-{tag}"
    if peer in ("gconn", "gconn-before"):
        # gconn-before runs ``python -m gconn`` in an earlier checkout (--before): the
        # working directory comes first on sys.path, ahead of the installed gconn
        process = fleet.start(name, pinned(PROXY_CPU, gconn_command(port, target)),
                              cwd=BEFORE[0] if peer == "gconn-before" else None)
        wait_for_line(process, "ready workers=")
    elif peer == "haproxy":
        path = os.path.join(scratch, f"{name}.cfg")
        with open(path, "w") as stream:
            stream.write(haproxy_config(port, target))
        process = fleet.start(name, pinned(PROXY_CPU, ["haproxy", "-db", "-f", path]))
    elif peer == "nginx":
        path = os.path.join(scratch, f"{name}.conf")
        with open(path, "w") as stream:
            stream.write(f"load_module {NGINX_STREAM_MODULE};\nworker_processes 1;\n"
                         f"daemon off;\npid {scratch}/{name}.pid;\nerror_log stderr;\n"
                         f"worker_rlimit_nofile 40000;\n"
                         f"events {{ worker_connections 40000; }}\n"
                         f"stream {{ server {{ listen 127.0.0.1:{port}; "
                         f"proxy_pass 127.0.0.1:{target}; }} }}\n")
        process = fleet.start(name, pinned(PROXY_CPU, ["nginx", "-c", path, "-p", scratch]))
    else:
        kind = "gevent" if peer == "gevent" else "asyncio"
        extra = ["--uvloop"] if peer == "uvloop" else []
        process = fleet.start(name, pinned(PROXY_CPU, [
            sys.executable, "-m", "gconn_tools.peers", kind, "--listen", f"127.0.0.1:{port}",
            "--target", f"127.0.0.1:{target}", *extra]), cwd=ROOT)
    wait_port(port, process)
    return process, port


def tree(process):
    """psutil processes of ``process`` and its children (a proxy may fork workers)."""
    import psutil
    root = psutil.Process(process.pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(process):
    return sum(sum(p.cpu_times()[:2]) for p in tree(process)) if process else 0.0


def rss_bytes(process):
    return sum(p.memory_info().rss for p in tree(process)) if process else 0


def redis_benchmark(port, clients, requests, keepalive=True):
    """(requests/s, p50 ms, p99 ms) from redis-benchmark's CSV output."""
    args = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients),
            "-n", str(requests), "-t", "ping_mbulk", "--csv"]
    if not keepalive:
        args += ["-k", "0"]
    output = subprocess.run(pinned(LOAD_CPU, args), capture_output=True, text=True,
                            timeout=600, check=True).stdout
    row = next(csv.DictReader(io.StringIO(output)))
    return float(row["rps"]), float(row["p50_latency_ms"]), float(row["p99_latency_ms"])


def iperf(port, seconds, streams, tries=2):
    """Received Gbit/s of an iperf3 run through ``port``; None (with the reasons printed)
    when iperf3 could not complete its test through this proxy in ``tries`` runs.  A failed
    run is printed even when the next one succeeds: iperf3's control connection now and then
    fails through a proxy (gevent's naive forwarder always, gconn rarely)."""
    for _ in range(tries):
        result = subprocess.run(pinned(LOAD_CPU, [
            "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams),
            "-J"]), capture_output=True, text=True, timeout=seconds + 60)
        try:
            report = json.loads(result.stdout)
        except ValueError:
            report = {}
        received = report.get("end", {}).get("sum_received")
        if received:
            return received["bits_per_second"] / 1e9
        reason = report.get("error") or result.stderr.strip() or "no result"
        print(f"    iperf3 -P {streams} failed through port {port}: {reason}", flush=True)
    return None


def hold_idle(fleet, port, count):
    """Start gconn-soak's client holding ``count`` idle connections; return it once held."""
    process = fleet.start(f"idle-{time.monotonic_ns()}", pinned(LOAD_CPU, [
        sys.executable, "-m", "gconn_tools.soak_client", "--target", f"127.0.0.1:{port}",
        "--clients", str(count), "--rate", "5000", "--duration", "3600",
        "--interval", "3600", "--payload", "0", "--churn", "0", "--index", "9"]), cwd=ROOT)
    wait_for_line(process, '"ramped"', timeout=120)
    return process


def measure(fleet, peer, backends, plan):
    """Every figure for one peer in one run."""
    figures = {}
    process, port = start_peer(fleet, peer, backends["redis"], "redis")
    try:
        redis_benchmark(port, 50, plan["requests"] // 10)  # warm-up at 50 clients only
        rss_before = rss_bytes(process)  # idle first: the proxy has not yet held more
        idle = hold_idle(fleet, port, plan["idle"])
        try:
            if process:
                figures["kb_per_idle"] = (rss_bytes(process) - rss_before) / plan["idle"] / 1024
            _, _, p99_idle = redis_benchmark(port, 50, plan["requests"])
        finally:
            fleet.stop(idle)
        cpu_before = cpu_seconds(process)
        rps, _, p99 = redis_benchmark(port, 50, plan["requests"])
        cpu = cpu_seconds(process) - cpu_before
        figures.update(rps_50=rps, p99_50_ms=p99, p99_idle_ratio=p99_idle / p99,
                       req_per_cpu_s=plan["requests"] / cpu if process and cpu > 0 else None)
        cpu_before = cpu_seconds(process)
        rps, _, p99 = redis_benchmark(port, 1000, plan["requests_1000"])
        cpu = cpu_seconds(process) - cpu_before
        figures.update(rps_1000=rps, p99_1000_ms=p99,
                       req_per_cpu_s_1000=plan["requests_1000"] / cpu
                       if process and cpu > 0 else None)
        figures["conn_per_s"] = redis_benchmark(port, 50, plan["connections"],
                                                keepalive=False)[0]
    finally:
        if process:
            fleet.stop(process)
    process, port = start_peer(fleet, peer, backends["iperf"], "iperf")
    try:
        figures["gbit_1"] = iperf(port, plan["seconds"], 1)
        figures["gbit_8"] = iperf(port, plan["seconds"], 8)
    finally:
        if process:
            fleet.stop(process)
    return figures


def start_backends(fleet):
    """redis-server and iperf3 -s on the load core; their ports."""
    for program in ("redis-server", "redis-benchmark", "iperf3", "taskset"):
        if shutil.which(program) is None:
            raise SystemExit(f"gconn-bench: {program} is needed: apt-get install redis-server "
                             "redis-tools iperf3 util-linux")
    redis_port, iperf_port = free_port(), free_port()
    redis = fleet.start("redis", pinned(LOAD_CPU, [
        "redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no",
        "--maxclients", "30000", "--bind", "127.0.0.1"]))
    iperf_server = fleet.start("iperf3", pinned(LOAD_CPU, ["iperf3", "-s", "-p",
                                                           str(iperf_port)]))
    wait_port(redis_port, redis)
    wait_port(iperf_port, iperf_server)
    return {"redis": redis_port, "iperf": iperf_port}


def run(options):
    plan = dict(QUICK if options.quick else FULL)
    if options.runs:
        plan["runs"] = options.runs
    fleet = Fleet()
    try:
        backends = start_backends(fleet)
        results = {peer: [] for peer in options.peers}
        skipped = {peer: reason for peer in options.peers if (reason := missing(peer))}
        for run_number in range(plan["runs"]):
            for peer in options.peers:  # interleaved: drift hits every peer alike
                if peer in skipped:
                    continue
                print(f"  run {run_number + 1}/{plan['runs']}: {peer}", flush=True)
                try:
                    results[peer].append(measure(fleet, peer, backends, plan))
                except (RuntimeError, subprocess.SubprocessError, SystemExit) as error:
                    skipped[peer] = f"failed: {error}"
    finally:
        fleet.stop_all()
    table = {}
    for peer in options.peers:
        if peer in skipped or not results[peer]:
            table[peer] = {"measured": False, "reason": skipped.get(peer, "no run")}
            continue
        row = {"measured": True}
        for key, _, _ in FIGURES:
            values = [r[key] for r in results[peer] if r.get(key) is not None]
            row[key] = round(statistics.median(values), 3) if values else None
        table[peer] = row
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "plan": plan,
            "command": "gconn-bench " + " ".join(sys.argv[1:]), "peers": table}


def machine():
    """A one-line description of this box."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as stream:
            model = next(line.split(":", 1)[1].strip() for line in stream
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {model}, Linux {os.uname().release}"


LOWER_IS_BETTER = {"p99_50_ms", "p99_1000_ms", "kb_per_idle", "p99_idle_ratio"}
PYTHON_PEERS = ("uvloop", "asyncio", "gevent")


def ratios(report):
    """gconn against HAProxy and against the best Python peer, figure by figure, from the
    same run: (heading, ratio to HAProxy, best Python peer, ratio to it), a ratio above 1
    meaning gconn did better (more per second, or less time or memory)."""
    peers = report["peers"]
    gconn = peers.get("gconn", {})
    if not gconn.get("measured"):
        return []

    def ratio(key, other):
        mine, theirs = gconn.get(key), other.get(key) if other.get("measured") else None
        if not mine or not theirs:
            return None
        return theirs / mine if key in LOWER_IS_BETTER else mine / theirs

    rows = []
    for key, heading, _ in FIGURES:
        if key == "p99_idle_ratio":
            continue  # already a ratio: compared against its goal, not against peers
        candidates = [(peer, ratio(key, peers[peer])) for peer in PYTHON_PEERS
                      if peer in peers and ratio(key, peers[peer]) is not None]
        best = min(candidates, key=lambda item: item[1]) if candidates else (None, None)
        rows.append((heading, ratio(key, peers.get("haproxy", {})), *best))
    return rows


def format_ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def render(report):
    """The results as a text table, then gconn's ratios to HAProxy and the Python peers."""
    headings = [heading for _, heading, _ in FIGURES]
    lines = ["| proxy | " + " | ".join(headings) + " |",
             "|---" * (len(headings) + 1) + "|"]
    for peer, row in report["peers"].items():
        if not row["measured"]:
            lines.append(f"| {peer} | not measured: {row['reason']} |")
            continue
        cells = [format_figure(row.get(key)) for key, _, _ in FIGURES]
        lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    rows = ratios(report)
    if rows:
        lines += ["", "gconn's ratios (above 1: gconn did better)", "",
                  "| figure | vs HAProxy | vs best Python peer |", "|---|---|---|"]
        lines += [f"| {heading} | {format_ratio(haproxy)} | "
                  f"{format_ratio(best)} ({peer or '-'}) |"
                  for heading, haproxy, peer, best in rows]
    return "\n".join(lines)


def rst_table(report):
    """The results as a reStructuredText list-table, with date, machine and command."""
    lines = [f"Measured {report['date']} on {report['machine']} with "
             f"``{report['command'].strip()}`` (medians of {report['plan']['runs']} runs; "
             "p99 in ms; KB/idle conn with "
             f"{report['plan']['idle']} idle connections held).", "",
             ".. list-table::", "   :header-rows: 1", "", "   * - proxy"]
    lines += [f"     - {heading}" for _, heading, _ in FIGURES]
    for peer, row in report["peers"].items():
        lines.append(f"   * - {peer}")
        if not row["measured"]:
            lines += ["     - not measured"] + ["     -"] * (len(FIGURES) - 1)
            continue
        lines += [f"     - {format_figure(row.get(key))}" for key, _, _ in FIGURES]
    rows = ratios(report)
    if rows:
        lines += ["", "gconn's ratios from the same runs (above 1: gconn did better; the "
                  "Python peer is the one closest to gconn on that figure):", "",
                  ".. list-table::", "   :header-rows: 1", "",
                  "   * - figure", "     - vs HAProxy", "     - vs best Python peer"]
        for heading, haproxy, peer, best in rows:
            lines += [f"   * - {heading}", f"     - {format_ratio(haproxy)}",
                      f"     - {format_ratio(best)} ({peer or '-'})"]
    return "\n".join(lines) + "\n"


def rewrite_readme(path, report):
    """Replace README's Performance table (between its markers) with this report's."""
    rewrite_between_markers(path, ".. performance-start", ".. performance-end",
                            rst_table(report))


def format_figure(value):
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.2f}"


def plot(report, path):
    plt = load_pyplot("gconn-bench")
    if plt is None:
        return
    base = report["peers"].get("noproxy", {})
    keys = [key for key, _, _ in FIGURES if base.get(key)]
    peers = [p for p, row in report["peers"].items() if row["measured"] and p != "noproxy"]
    figure, axes = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(1, len(peers))
    for number, peer in enumerate(peers):
        row = report["peers"][peer]
        axes.bar([k + number * width for k in range(len(keys))],
                 [(row.get(key) or 0) / base[key] for key in keys], width, label=peer)
    axes.set_xticks([k + 0.4 for k in range(len(keys))])
    axes.set_xticklabels([dict((k, h) for k, h, _ in FIGURES)[key] for key in keys],
                         rotation=20, fontsize=8)
    axes.set_ylabel("ratio to no proxy")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gconn-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced set for CI")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated, from {', '.join(PEERS)}")
    parser.add_argument("--runs", type=int, default=0, help="runs per peer (median)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--plot", metavar="FILE.png")
    parser.add_argument("--readme", metavar="README.rst",
                        help="rewrite the Performance table in this file")
    parser.add_argument("--before", metavar="DIR",
                        help="also measure the gconn checked out in DIR (say, today's main) as "
                             "peer gconn-before, side by side in the same runs")
    parser.add_argument("--from-json", metavar="FILE", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.peers = [peer.strip() for peer in options.peers.split(",") if peer.strip()]
    if options.before:
        if not os.path.isfile(os.path.join(options.before, "gconn", "__main__.py")):
            parser.error(f"--before {options.before}: no gconn checkout there")
        BEFORE[0] = os.path.abspath(options.before)
        options.peers.insert(options.peers.index("gconn") + 1 if "gconn" in options.peers
                             else 0, "gconn-before")
    unknown = set(options.peers) - set(PEERS) - {"gconn-before"}
    if unknown:
        parser.error(f"unknown peer {sorted(unknown)[0]!r}; choose from {', '.join(PEERS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))  # atexit then stops every process
    if options.from_json:  # re-render an earlier run (README, plot) without measuring again
        with open(options.from_json) as stream:
            report = json.load(stream)
    else:
        try:
            report = run(options)
        except KeyboardInterrupt:
            print("gconn-bench: interrupted; stopped every process it started",
                  file=sys.stderr)
            return 130
    print(f"\ngconn-bench {report['date']} on {report['machine']}")
    print(render(report))
    if options.json:
        with open(options.json, "w") as stream:
            json.dump(report, stream, indent=2)
    if options.plot:
        plot(report, options.plot)
    if options.readme:
        rewrite_readme(options.readme, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
