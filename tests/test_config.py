"""Configuration: bad input exits 2 with one line naming file, line and key; a port in use exits 1;
flag > env > file > default; the example config and README table are derived from the registry."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from gconn.config import Value, load
from gconn.docs import render_example_config, render_option_table
from gconn.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROUTE = "[route:a]\nbind = 127.0.0.1:0\ndestinations = 127.0.0.1:9\n"


def run_gconn(*args, env=None, timeout=30):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GCONN_")}
    full_env["GCONN_ADMIN"] = ""  # no admin endpoint: these runs must not need port 8421
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gconn", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, stdin=subprocess.DEVNULL)


BAD_CONFIGS = [
    ("unknown key", ROUTE + "frobnicate = 3\n", 4, "frobnicate"),
    ("bad duration", ROUTE + "connect-timeout = 5 parsecs\n", 4, "connect-timeout"),
    ("bad port", "[route:a]\nbind = 127.0.0.1:99999\ndestinations = 127.0.0.1:9\n", 2, "bind"),
    ("bad destination port", "[route:a]\nbind = 127.0.0.1:0\ndestinations = h:0\n", 3,
     "destinations"),
    ("unknown strategy", ROUTE + "strategy = fastest\n", 4, "strategy"),
    ("route without destinations", "[gconn]\nlog-level = info\n[route:a]\nbind = 127.0.0.1:0\n",
     3, "destinations"),
    ("two routes on one address", "[route:a]\nbind = 127.0.0.1:7000\ndestinations = h:1\n"
     "[route:b]\ndestinations = h:2\nbind = 127.0.0.1:7000\n", 6, "bind"),
    ("bad log level", "[gconn]\nlog-level = loud\n" + ROUTE, 2, "log-level"),
    ("route-only key in [gconn]", "[gconn]\nbind = 127.0.0.1:1\n" + ROUTE, 2, "bind"),
    ("bad max-connections", ROUTE + "max-connections = -3\n", 4, "max-connections"),
    ("backup without fallback strategy",
     "[route:a]\nbind = 127.0.0.1:0\ndestinations = h:1, h:2 backup\n", 3, "destinations"),
    ("bad destination send-proxy",
     "[route:a]\nbind = 127.0.0.1:0\ndestinations = h:1 send-proxy=v3\n", 3, "destinations"),
    ("unknown protocol", ROUTE + "protocol = oracle\n", 4, "protocol"),
    ("destination-tls-ca missing", ROUTE + "destination-tls = yes\n"
     "destination-tls-ca = /nonexistent/ca.pem\n", 5, "destination-tls-ca"),
    ("source not an IP address", ROUTE + "source = eth0\n", 4, "source"),
    ("zero connect-timeout", ROUTE + "connect-timeout = 0\n", 4, "connect-timeout"),
    ("zero buffer-size", ROUTE + "buffer-size = 0\n", 4, "buffer-size"),
    ("worker-timeout below heartbeats", "[gconn]\nworker-timeout = 0\n" + ROUTE, 2,
     "worker-timeout"),
    ("unknown loop", "[gconn]\nloop = kqueue\n" + ROUTE, 2, "loop"),
    ("unknown section", "[routes]\nbind = 1\n", 1, None),
    ("line without equals", ROUTE + "just words\n", 4, None),
    ("key before any section", "bind = 127.0.0.1:0\n" + ROUTE, 1, "bind"),
    ("key given twice", ROUTE + "bind = 127.0.0.1:1\n", 4, "bind"),
    ("[gconn] given twice", "[gconn]\nworkers = 1\n[gconn]\n" + ROUTE, 3, None),
    ("route defined twice", ROUTE + "[route:a]\nbind = 127.0.0.1:0\n", 4, None),
    ("bad route name", "[route:a b]\nbind = 127.0.0.1:0\ndestinations = h:1\n", 1, None),
    ("process key in a route", ROUTE + "workers = 2\n", 4, "workers"),
    ("command-line action in [gconn]", "[gconn]\ncheck-config = yes\n" + ROUTE, 2,
     "check-config"),
    ("config file named in [gconn]", "[gconn]\nconfig = other.conf\n" + ROUTE, 2, "config"),
]


@pytest.mark.parametrize("case, text, line, key", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line_naming_file_line_and_key(tmp_path, case, text, line,
                                                                      key):
    """Each bad config: exit 2, one line on stderr naming file:line and the key, no traceback."""
    path = tmp_path / "bad.conf"
    path.write_text(text)
    result = run_gconn("-c", str(path), "--check-config")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{path}:{line}" in lines[0]
    if key:
        assert key in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("make", [
    lambda tmp: tmp / "missing.conf",
    lambda tmp: tmp,  # a directory
    lambda tmp: (tmp / "latin1.conf").write_bytes(b"[gconn]\nlog-level = \xe9\n") and
    tmp / "latin1.conf",
], ids=["missing", "directory", "not-utf8"])
def test_unreadable_config_file_exits_2_naming_it(tmp_path, make):
    """A missing, unreadable or non-text config file: exit 2 with one line naming the file."""
    path = make(tmp_path)
    result = run_gconn("-c", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr


def test_bad_flag_and_env_values_name_their_source():
    """A bad value from a flag names the flag; from the environment names the variable."""
    flag = run_gconn("--bind", "127.0.0.1:0", "--destination", "h:1", "--idle-timeout", "soon")
    assert flag.returncode == 2 and "--idle-timeout" in flag.stderr and "soon" in flag.stderr
    env = run_gconn("--bind", "127.0.0.1:0", "--destination", "h:1",
                    env={"GCONN_STRATEGY": "random"})
    assert env.returncode == 2 and "GCONN_STRATEGY" in env.stderr and "random" in env.stderr


def test_no_route_at_all_is_a_config_error():
    """Neither --bind nor a route section: exit 2 saying how to give one."""
    result = run_gconn()
    assert result.returncode == 2 and "--bind" in result.stderr


def test_port_in_use_exits_1_naming_the_address():
    """A port already taken: exit 1 with the address in one line, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_gconn("--bind", f"127.0.0.1:{port}", "--destination", "127.0.0.1:9",
                           "--log-level", "error")
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def effective(result, key):
    """(value, source) of ``key`` in --check-config output."""
    for line in result.stdout.splitlines():
        if line.startswith(f"{key} ="):
            value, _, source = line.partition(";")
            return value.split("=", 1)[1].strip(), source.strip()
    raise AssertionError(result.stdout + result.stderr)


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    """connect-timeout: default, then the file's, then the environment's, then the flag's."""
    path = tmp_path / "gconn.conf"
    path.write_text(ROUTE + "connect-timeout = 2s\n")
    base = ["--check-config"]
    assert effective(run_gconn("--bind", "127.0.0.1:0", "--destination", "h:1", *base),
                     "connect-timeout") == ("1s", "default")
    assert effective(run_gconn("-c", str(path), *base), "connect-timeout") == \
        ("2s", f"{path}:4")
    env = {"GCONN_CONNECT_TIMEOUT": "3s"}
    assert effective(run_gconn("-c", str(path), *base, env=env), "connect-timeout") == \
        ("3s", "env GCONN_CONNECT_TIMEOUT")
    assert effective(run_gconn("-c", str(path), "--connect-timeout", "4s", *base, env=env),
                     "connect-timeout") == ("4s", "flag --connect-timeout")


def test_gconn_section_gives_route_defaults(tmp_path):
    """A route option in [gconn] is the default for every route; a route's own value wins."""
    path = tmp_path / "gconn.conf"
    path.write_text("[gconn]\nidle-timeout = 2m\n" + ROUTE +
                    "[route:b]\nbind = 127.0.0.1:0\ndestinations = h:2\nidle-timeout = 5m\n")
    result = run_gconn("-c", str(path), "--check-config")
    assert result.returncode == 0, result.stderr
    sections = result.stdout.split("[route:")
    assert "idle-timeout = 2m" in sections[1] and f"{path}:2" in sections[1]
    assert "idle-timeout = 5m" in sections[2]


def write_config(tmp_path, text):
    """Write ``text`` as tmp_path/gconn.conf and return its path as a string."""
    path = tmp_path / "gconn.conf"
    path.write_text(text)
    return str(path)


def test_load_takes_each_value_and_its_origin_from_configargparse(tmp_path):
    """load(): flag > env > [gconn] > default per setting, each Value naming where it came from."""
    path = write_config(tmp_path, "[gconn]\nlog-level = debug\nworkers = 2\n"
                                  "idle-timeout = 2m\n" + ROUTE)
    config, options = load(["-c", path, "--workers", "3"], environ={"GCONN_LOG_FILE": "x.log"})
    process = config.values["gconn"]
    assert process["workers"] == Value("3", "flag --workers")
    assert process["log-file"] == Value("x.log", "env GCONN_LOG_FILE")
    assert process["log-level"] == Value("debug", f"{path}:2")
    assert process["loop"] == Value("default", "default")
    assert config.values["route:a"]["idle-timeout"] == Value("2m", f"{path}:4")
    assert config.values["route:a"]["bind"] == Value("127.0.0.1:0", f"{path}:6")
    assert config.process.workers == 3 and config.routes[0].idle_timeout == 120
    assert config.path == path and not options.check_config


def test_route_option_from_flag_or_env_overrides_every_route(tmp_path):
    """A route option given as a flag or in the environment beats each route's own key."""
    path = write_config(tmp_path, ROUTE + "idle-timeout = 5m\nstrategy = next-available\n"
                                  "[route:b]\nbind = 127.0.0.1:0\ndestinations = h:2\n")
    config, _ = load(["-c", path, "--idle-timeout", "1h"],
                     environ={"GCONN_STRATEGY": "round-robin"})
    assert [route.name for route in config.routes] == ["a", "b"]
    for section in ("route:a", "route:b"):
        assert config.values[section]["idle-timeout"] == Value("1h", "flag --idle-timeout")
        assert config.values[section]["strategy"] == Value("round-robin", "env GCONN_STRATEGY")


def test_command_line_route_joins_the_file_routes(tmp_path):
    """--bind and --destination add a route named by --route-name after the file's routes."""
    path = write_config(tmp_path, ROUTE)
    config, _ = load(["-c", path, "--bind", "127.0.0.1:0", "--destination", "h:1",
                      "--destination", "h:2 backup", "--strategy", "round-robin-with-fallback"],
                     environ={"GCONN_ROUTE_NAME": "cli"})
    assert [route.name for route in config.routes] == ["a", "cli"]
    assert config.values["route:cli"]["destinations"] == Value("h:1, h:2 backup",
                                                               "flag --destination")


def test_config_file_named_by_the_environment(tmp_path):
    """GCONN_CONFIG names the config file as -c does; -c wins over it."""
    path = write_config(tmp_path, ROUTE)
    config, _ = load([], environ={"GCONN_CONFIG": path})
    assert config.path == path and config.values["route:a"]["bind"].source == f"{path}:2"
    with pytest.raises(ConfigError, match="missing.conf"):
        load(["-c", str(tmp_path / "missing.conf")], environ={"GCONN_CONFIG": path})


def test_config_path_starting_with_tilde_is_read_from_home(tmp_path, monkeypatch):
    """-c ~/gconn.conf reads the file in the home directory (ConfigArgParse expands ~)."""
    path = write_config(tmp_path, ROUTE)
    monkeypatch.setenv("HOME", str(tmp_path))
    config, _ = load(["-c", "~/gconn.conf"], environ={})
    assert config.path == path


def test_a_bad_file_value_that_a_flag_overrides_is_not_checked(tmp_path):
    """Only effective values are checked: a bad [gconn] value under a flag is no error."""
    path = write_config(tmp_path, "[gconn]\nlog-level = loud\n" + ROUTE)
    config, _ = load(["-c", path, "--log-level", "error"], environ={})
    assert config.values["gconn"]["log-level"] == Value("error", "flag --log-level")


def test_an_empty_switch_value_is_as_if_not_given(tmp_path):
    """An empty admin-insecure, in the file as in the environment, keeps the default."""
    # ConfigArgParse skips an empty value for a flag whose value is optional (nargs="?")
    in_file = write_config(tmp_path, "[gconn]\nadmin-insecure =\n" + ROUTE)
    config, _ = load(["-c", in_file], environ={})
    assert config.values["gconn"]["admin-insecure"] == Value("no", "default")
    in_env = write_config(tmp_path, ROUTE)
    config, _ = load(["-c", in_env], environ={"GCONN_ADMIN_INSECURE": ""})
    assert config.values["gconn"]["admin-insecure"] == Value("no", "default")


def test_a_bad_file_raises_config_error_rather_than_exiting(tmp_path):
    """load() raises ConfigError for a missing or malformed file, so a reload cannot exit."""
    for argv in (["-c", str(tmp_path / "missing.conf")],
                 ["-c", write_config(tmp_path, "[routes]\nbind = 1\n")]):
        with pytest.raises(ConfigError):
            load(argv, environ={})


def test_an_abbreviated_flag_is_refused():
    """--connect-t is not taken for --connect-timeout: its origin would be misreported."""
    result = run_gconn("--bind", "127.0.0.1:0", "--destination", "h:1", "--connect-t", "2s",
                       "--check-config")
    assert result.returncode == 2 and "--connect-t" in result.stderr


def test_example_config_is_generated_from_the_registry_and_valid():
    """conf/gconn.conf equals what the settings registry renders, and it passes --check-config."""
    example = ROOT / "conf" / "gconn.conf"
    assert example.read_text() == render_example_config()
    result = run_gconn("-c", str(example), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "[route:echo]" in result.stdout


def test_readme_option_table_matches_the_registry():
    """README.rst's option table is the one the settings registry renders."""
    assert render_option_table() in (ROOT / "README.rst").read_text()


def test_version_from_both_entry_points():
    """gconn --version and python -m gconn --version print the version."""
    from gconn import __version__
    module = run_gconn("--version")
    assert module.returncode == 0 and __version__ in module.stdout
    script = pathlib.Path(sys.executable).with_name("gconn")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run runs the very test command that README.rst gives a newcomer."""
    readme = (ROOT / "README.rst").read_text().splitlines()
    start = next(n for n, line in enumerate(readme) if line.startswith("The one command"))
    command = next(line for line in readme[start:] if line.startswith("    "))
    assert command.strip() in (ROOT / ".ci" / "run").read_text().splitlines()
