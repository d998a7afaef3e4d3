"""gconn-soak run small: its report's fields, and that it fails on corruption or a dead gconn."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

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
def test_small_soak_reports_every_field_and_passes(tmp_path):
    """2,000 clients for 10 s: nothing lost, every report field present, leak check passed."""
    report_path = tmp_path / "soak.json"
    code, output = soak("--clients", "2000", "--duration", "10", "--interval", "1",
                        "--json", str(report_path))
    assert code == 0, output
    report = json.loads(report_path.read_text())
    assert report["peak_concurrent"] == 2000
    assert report["connected_total"] >= 2000 and report["connect_failures"] == {}
    assert report["lost"] == 0 and report["corrupted"] == 0
    assert report["echoes_verified"] == report["echoes_sent"] >= 2000 * 5
    assert report["bytes_verified"] == report["echoes_verified"] * (16 + 64)
    for key in ("p50", "p99"):
        assert report["connect_ms"][key] > 0 and report["echo_rtt_ms"][key] > 0
    assert report["echo_rtt_ms"]["max"] >= report["echo_rtt_ms"]["p99"]
    gconn = report["gconn"]
    assert gconn["fds_peak"] >= gconn["fds_baseline"] + 2 * 2000
    assert gconn["fds_after"] == gconn["fds_baseline"]
    assert gconn["rss_per_connection_kb"] > 0 and gconn["cpu_seconds"] > 0
    assert gconn["rss_after_second_wave_mb"] > 0
    assert report["leak_check"] == {"descriptors_returned": True,
                                    "rss_stable_over_second_wave": True, "passed": True}
    assert report["passed"] and report["ramp_s"] > 0 and report["connect_rate_per_s"] > 0
    assert "gconn-soak report" in output and "PASSED" in output


@pytest.mark.timeout(300)
def test_soak_fails_when_a_destination_flips_a_byte(tmp_path):
    """An echo backend that inverts one byte per connection: corrupted > 0 and exit 1."""
    report_path = tmp_path / "soak.json"
    code, output = soak("--clients", "200", "--duration", "3", "--interval", "0.5",
                        "--echo-args", "--flip-byte-at 40", "--json", str(report_path))
    assert code == 1, output
    report = json.loads(report_path.read_text())
    assert report["corrupted"] > 0 and not report["passed"]
    assert any("corrupted" in problem for problem in report["problems"])


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
