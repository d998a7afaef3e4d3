"""gconn-bench --quick against gconn and no proxy: it runs and its JSON has every figure."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_quick_bench_of_gconn_and_no_proxy_has_every_figure(tmp_path):
    """--quick --peers noproxy,gconn: exit 0, a table, and a JSON report with every figure."""
    from gconn_tools.bench import FIGURES
    report_path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "gconn_tools.bench", "--quick", "--peers", "noproxy,gconn,nosuch"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown peer 'nosuch'" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "gconn_tools.bench", "--quick", "--peers", "noproxy,gconn",
         "--json", str(report_path)], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| gconn |" in result.stdout and "| noproxy |" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["plan"]["runs"] == 1 and report["machine"] and report["date"]
    assert set(report["peers"]) == {"noproxy", "gconn"}
    gconn, direct = report["peers"]["gconn"], report["peers"]["noproxy"]
    assert gconn["measured"] and direct["measured"]
    for key, _, _ in FIGURES:
        assert gconn[key] is not None and gconn[key] > 0, key
    for key in ("rps_50", "rps_1000", "conn_per_s", "gbit_1", "gbit_8", "p99_idle_ratio"):
        assert direct[key] > 0, key
    assert direct["kb_per_idle"] is None and direct["req_per_cpu_s"] is None
