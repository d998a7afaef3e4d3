"""gconn-soak run small: its report's fields, and the outcomes it tells apart (lost, late, cut
with gconn's end reason, corrupted, a dead gconn), each caused by a misbehaving destination."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from gconn_tools import soak as soak_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def soak(*args, timeout=240):
    """Run gconn-soak as a subprocess (its own group); return (exit code, output)."""
    process = subprocess.Popen([sys.executable, "-m", "gconn_tools.soak", *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, output


@pytest.mark.timeout(300)
def test_small_soak_with_baseline_reports_every_field_and_passes(tmp_path):
    """2,000 clients for 10 s, straight to the echo first, then through gconn: nothing lost,
    late or cut, every report field present, the leak check passed, the plot drawn."""
    report_path, plot_path = tmp_path / "soak.json", tmp_path / "soak.png"
    code, output = soak("--clients", "2000", "--duration", "10", "--interval", "1",
                        "--baseline", "--json", str(report_path), "--plot", str(plot_path))
    assert code == 0, output
    report = json.loads(report_path.read_text())
    assert report["peak_concurrent"] == 2000
    assert report["connected_total"] >= 2000 and report["connect_failures"] == {}
    assert (report["lost"], report["corrupted"], report["cut"], report["late"]) == (0, 0, 0, 0)
    assert report["echoes_verified"] == report["echoes_sent"] >= 2000 * 9
    assert report["bytes_verified"] == report["echoes_verified"] * (16 + 64)
    for key in ("p50", "p99"):
        assert report["connect_ms"][key] > 0 and report["echo_rtt_ms"][key] > 0
    assert report["echo_rtt_ms"]["max"] >= report["echo_rtt_ms"]["p99"]
    harness = report["harness"]
    assert 0 <= harness["lag_ms"]["p50"] <= harness["lag_ms"]["p99"] <= harness["lag_ms"]["max"]
    assert [p["clients_process"] for p in harness["per_process"]] == [0]
    assert harness["per_process"][0]["lag_ms"]["p99"] == harness["lag_ms"]["p99"]
    assert harness["cpu_seconds"]["clients"] > 0 and harness["cpu_seconds"]["echo"] > 0
    assert harness["cpu_per_echo_us"] > 0
    assert 0 < report["cpu_share"]["gconn"] < 1 and 0 < report["cpu_share"]["harness"] < 1
    assert report["cpu_per_echo_in_hold_us"]["gconn"] > 0
    gconn = report["gconn"]
    assert gconn["fds_peak"] >= gconn["fds_baseline"] + 2 * 2000
    assert gconn["fds_after"] == gconn["fds_baseline"]
    assert gconn["rss_per_connection_kb"] > 0 and gconn["cpu_seconds"] > 0
    assert gconn["rss_after_second_wave_mb"] > 0
    assert report["leak_check"] == {"descriptors_returned": True,
                                    "rss_stable_over_second_wave": True, "passed": True}
    assert report["passed"] and report["ramp_s"] > 0 and report["connect_rate_per_s"] > 0
    baseline = report["baseline"]
    assert baseline["echoes_verified"] == baseline["echoes_sent"] >= 2000 * 9
    assert (baseline["lost"], baseline["corrupted"], baseline["cut"]) == (0, 0, 0)
    assert baseline["cpu_share"]["gconn"] is None  # no gconn in that phase
    added = baseline["added_latency_ms"]
    assert added["p50"] == round(report["echo_rtt_ms"]["p50"] - baseline["echo_rtt_ms"]["p50"], 3)
    assert added["p50_ratio"] > 0 and added["p99_ratio"] > 0 and added["connect_rate_ratio"] > 0
    phases = [point["phase"] for point in report["timeline"]]
    assert phases[0] == "direct" and phases[-1] == "gconn"
    assert all("rss_mb" in p and "fds" in p for p in report["timeline"] if p["phase"] == "gconn")
    assert "gconn-soak report" in output and "PASSED" in output and "gconn adds ms" in output
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def faulty_soak(tmp_path, fault, *args):
    """200 clients through gconn to echo destinations that all misbehave with ``fault``."""
    report_path = tmp_path / "soak.json"
    code, output = soak("--clients", "200", "--duration", "3", "--interval", "0.25",
                        "--no-second-wave", "--echo-args", f"--fault {fault}",
                        "--json", str(report_path), *args)
    return code, output, json.loads(report_path.read_text())


@pytest.mark.timeout(300)
def test_soak_fails_when_a_destination_flips_a_byte(tmp_path):
    """An echo backend that inverts one byte per connection: corrupted > 0 and exit 1."""
    code, output, report = faulty_soak(tmp_path, "flip@40")
    assert code == 1, output
    assert report["corrupted"] == 200 and not report["passed"]
    assert report["lost"] == 0 and report["cut"] == 0
    assert any("corrupted" in problem for problem in report["problems"])


@pytest.mark.timeout(300)
def test_an_echo_a_destination_drops_is_lost_not_late(tmp_path):
    """Each connection's second echo is swallowed, the connection stays open: 200 lost (the
    later echoes still verify), none corrupted, late or cut, and the run fails."""
    code, output, report = faulty_soak(tmp_path, "drop@80:80")
    assert code == 1, output
    assert report["lost"] == 200
    assert (report["corrupted"], report["late"], report["cut"]) == (0, 0, 0)
    assert report["echoes_verified"] == report["echoes_sent"] - 200 > 200
    assert report["problems"] == ["200 lost, 0 corrupted echoes"]


@pytest.mark.timeout(300)
def test_an_echo_a_destination_delays_is_late_with_its_delay(tmp_path):
    """Each connection's second echo is held 1.5 s: late with that delay, not lost, and the
    run passes when late echoes are under the user's threshold."""
    code, output, report = faulty_soak(tmp_path, "delay@80:1.5", "--late-after", "0.5",
                                       "--max-late", "100")
    assert code == 0, output
    assert report["late"] >= 200 and report["late_after_s"] == 0.5
    assert (report["lost"], report["corrupted"], report["cut"]) == (0, 0, 0)
    assert report["echoes_verified"] == report["echoes_sent"]
    assert 1400 <= report["late_delay_ms"]["max"] <= 3000
    assert report["late_delay_ms"]["p50"] >= 500
    assert "late (over 0.5 s)" in output


@pytest.mark.timeout(300)
def test_a_destination_reset_mid_echo_is_cut_with_gconns_end_reason(tmp_path):
    """The destination resets every connection with an echo in flight: 200 connections cut,
    each named with the end reason gconn logged for it; the run fails.  The harness warning
    is forced (--max-lag 0) to show it is printed."""
    code, output, report = faulty_soak(tmp_path, "reset@80", "--max-lag", "0")
    assert code == 1, output
    assert report["cut"] == 200 and report["cut_echoes_in_flight"] == 200
    assert report["lost"] == 0 and report["corrupted"] == 0
    assert sum(report["cut_seen"].values()) == 200
    assert report["cut_end_reasons"] == {"destination_closed": 200}
    listed = report["cut_connections"]
    assert len(listed) == 50
    for cut in listed:
        assert cut["client"].startswith("127.0.2.") and cut["in_flight"] == 1
        assert cut["end"] == "destination_closed" and "reset" in cut["error"]
    assert report["cut_listed"] == 200
    assert any("200 connections cut (of 200 listed: 200 destination_closed)" in p
               for p in report["problems"])
    assert report["harness_bottleneck"]
    assert "warning: the harness, not gconn, is the bottleneck" in output


@pytest.mark.parametrize("fault", ["bogus@1", "delay@x:1", "drop@80:many", "reset@80:2"])
def test_echo_refuses_a_bad_fault_clearly(fault):
    """gconn-echo --fault with a wrong kind, offset or argument: exit 2 and one line that
    names the value and what is allowed, no traceback."""
    result = subprocess.run([sys.executable, "-m", "gconn.echo", "--bind", "127.0.0.1:0",
                             "--fault", fault], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr == (f"gconn-echo: --fault: {fault!r}: expected flip@OFFSET, "
                             f"drop@OFFSET:COUNT, delay@OFFSET:SECONDS or reset@OFFSET\n")


def test_late_echoes_fail_the_run_only_beyond_the_users_threshold():
    """The verdict: late echoes alone fail a run only above --max-late percent."""
    def judged(late, max_late):
        report = {"lost": 0, "corrupted": 0, "cut": 0, "cut_end_reasons": {}, "late": late,
                  "echoes_sent": 1000, "late_delay_ms": {"max": 1500.0},
                  "connect_failures": {}, "gconn_died": False, "echoes_verified": 1000}
        options = soak_tool.parse_args(["--max-late", str(max_late)])
        return soak_tool.verdict(report, options), report["problems"]

    assert judged(10, 1) == (0, [])
    assert judged(11, 1) == (1, ["11 late echoes (over 1 % of 1000; slowest 1500.0 ms)"])
    assert judged(0, 0) == (0, [])
    assert judged(1, 0)[0] == 1


@pytest.mark.timeout(300)
def test_soak_fails_when_gconn_is_killed_mid_run(tmp_path):
    """gconn killed during the hold: the soak says so, fails, and leaves no process behind."""
    report_path = tmp_path / "soak.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "gconn_tools.soak", "--clients", "300", "--duration", "20",
         "--interval", "0.5", "--json", str(report_path)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        gconn_pid = None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "gconn pid=" in line:
                gconn_pid = int(line.split("gconn pid=")[1].split()[0])
            if gconn_pid and "connected    300/300" in line:
                break
        assert gconn_pid, "".join(lines)
        os.killpg(gconn_pid, signal.SIGKILL)  # supervisor and workers: gconn is gone
        output = "".join(lines) + process.stdout.read()
        assert process.wait(timeout=120) == 1, output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
    report = json.loads(report_path.read_text())
    assert report["gconn_died"] and not report["passed"]
    assert "gconn died" in output
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{gconn_pid}"):
        assert time.monotonic() < deadline, "gconn's supervisor was left behind"
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_every_fault_under_load_is_accounted_and_loses_nothing(tmp_path):
    """300 clients hold verified streams while each fault is injected in turn: no echo lost
    or corrupted anywhere; only kill-worker and destination-reset cut streams, the first no
    more than the killed worker held (as the supervisor logged), the second each logged by
    gconn as destination_closed; reloads, a stalled destination, slow readers, slowloris and a
    flood cut none; slowloris connections are all reclaimed; new clients are served again
    after every fault; and gconn returns to its baseline."""
    report_path = tmp_path / "faults.json"
    code, output = soak("--clients", "300", "--rate", "1000", "--interval", "1",
                        "--faults", "all", "--flood", "3000", "--no-second-wave",
                        "--json", str(report_path))
    assert code == 0, output
    report = json.loads(report_path.read_text())
    assert report["lost"] == report["corrupted"] == 0
    accounts = {account["fault"]: account for account in report["faults"]}
    assert list(accounts) == ["kill-worker", "reload", "destination-reset", "destination-stall",
                              "slow-readers", "slowloris", "flood"]
    for name, account in accounts.items():
        assert account["lost"] == 0 and account["recovery_s"] is not None, account
        if name not in ("kill-worker", "destination-reset"):
            assert account["cut"] == 0, account
    killed = accounts["kill-worker"]
    assert 0 < killed["cut"] <= killed["worker_held"] and killed["replaced_s"] is not None
    reset = accounts["destination-reset"]
    assert reset["cut"] > 0 and reset["gconn_logged"].get("destination_closed") == reset["cut"]
    assert accounts["reload"]["reloads"] == 3
    assert accounts["destination-stall"]["late"] > 0  # held by backpressure, then delivered
    loris = accounts["slowloris"]["load"]
    assert loris["connected"] == 300 and loris["reclaimed"] == 300 and loris["still_open"] == 0
    assert accounts["flood"]["load"]["connects"] == 3000
    assert report["leak_check"]["descriptors_returned"]
