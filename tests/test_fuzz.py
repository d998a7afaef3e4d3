"""Garbage in, clear errors out, fuzzed (hypothesis): any config text and any flag or environment
value loads or is one line naming it (exit 2, never a traceback); any query string and method
on the admin endpoint gets the endpoint's answer or a 4xx of one JSON line, never a 500; any
bytes on a worker's control socket get an answer, an error or a close, never a dead or hung
worker.

Most config examples call ``config.load`` in-process; a few run ``python -m gconn
--check-config``.  The admin and control tests start one daemon each and drive every example
against it over real HTTP / the real unix socket.  ``GCONN_FUZZ_SCALE=10`` runs ten times the
examples.
"""

import contextlib
import glob
import io
import json
import os
import socket
import string
import subprocess
import sys
import urllib.parse

import pytest
from conftest import connect
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gconn.config import load
from gconn.errors import ConfigError
from gconn.settings import SETTINGS
from gconn.sockets import keepalive_options

SCALE = int(os.environ.get("GCONN_FUZZ_SCALE", "1"))  # multiplies every max_examples
ANSWER_TIMEOUT = 10.0  # seconds an admin or control answer may take before the test fails
ROUTE = "[route:a]\nbind = 127.0.0.1:0\ndestinations = 127.0.0.1:9\n"
BASE_FLAGS = ["--bind", "127.0.0.1:0", "--destination", "127.0.0.1:9"]


def fuzz(examples):
    """hypothesis settings: ``examples`` (times SCALE), no deadline (a daemon answers at its
    pace), the daemon fixtures allowed."""
    return settings(max_examples=examples * SCALE, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# --- (a) the config parser -------------------------------------------------------------------

# values that have broken parsers before, or that argparse and ConfigArgParse read specially
NASTY_VALUES = [
    "", "-", "--", "-x", "--x=1", "--help", "[]", "[a, b]", "[-x]", "[--]", "@file", "\\q",
    "\\x", "\\N{nothing}", "9" * 400, "1" * 5000, "99999999999999d", "nan", "inf", "1e400",
    "-1", "0", "٣", "²", "x" * 300, "/", "/dev/null", "/nonexistent/file.pem", "%(here)s",
    "'", '"', "true", "yes", "0.0.0.0:1", "[::]:0", "unix:", "unix:/", "a b:1", "h:1 backup",
    "h:1 tls=maybe", "*.", "10.0.0.0/33", "::1/200",
]
KEYS = [setting.name for setting in SETTINGS] + ["config", "check-config", "version", "help",
                                                 "route-name", "destination", ""]
one_line_text = st.text(st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="\r\n"), max_size=40)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
values = st.one_of(
    st.sampled_from(NASTY_VALUES),
    st.sampled_from([setting.default or "" for setting in SETTINGS]),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(-10, 10**20),
              st.sampled_from(["", "ms", "s", "m", "h", "d", "k", "m", "g", "kb", " s"])),
    st.builds(lambda host, port: f"{host}:{port}",
              st.sampled_from(["127.0.0.1", "localhost", "[::1]", "::1", "h", "", "[x]"]),
              st.integers(-1, 70000)),
    one_line_text,
)
ini_lines = st.one_of(
    st.sampled_from(["[gconn]", "[route:a]", "[route:b]", "[ route : c ]", "[route:]",
                     "[route:a b]", "[routes]", "[]", "[[gconn]]", "", "; comment", "# comment",
                     "key without equals", "= value", "[gconn] ; trailing"]),
    st.builds(lambda name: f"[{name}]", one_line_text),
    st.builds(lambda key, value, spaces: f"{key}{spaces}={spaces}{value}",
              st.one_of(st.sampled_from(KEYS), one_line_text), values,
              st.sampled_from(["", " ", "\t"])),
    one_line_text,
)
ini_texts = st.one_of(
    st.builds(lambda base, lines: (ROUTE if base else "") + "\n".join(lines) + "\n",
              st.booleans(), st.lists(ini_lines, max_size=12)),
    any_text,
)
# (option, environment variable) of everything a flag can set; --route-name is no setting
OPTIONS = [(setting.option, setting.env) for setting in SETTINGS] + [
    ("--route-name", "GCONN_ROUTE_NAME")]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory for the config files the examples write."""
    return tmp_path_factory.mktemp("fuzz")


def load_or_explain(argv, environ):
    """Run config.load; None if the config is good, else the ConfigError's text.  Anything
    else it raises, or anything it prints, fails the example."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            load(argv, environ=environ)
    except ConfigError as error:
        explanation = str(error)
    else:
        explanation = None
    assert printed.getvalue() == ""
    if explanation is not None:
        assert len(explanation.splitlines()) == 1, explanation
    return explanation


@fuzz(400)
@given(text=ini_texts)
def test_any_text_as_a_config_file_loads_or_names_the_file(scratch, text):
    """Any text as the config file: it loads, or one ConfigError line naming the file."""
    path = scratch / "any.conf"
    path.write_text(text, encoding="utf-8")
    explanation = load_or_explain(["-c", str(path)], environ={})
    assert explanation is None or str(path) in explanation


@fuzz(60)
@given(data=st.binary(max_size=200))
def test_any_bytes_as_a_config_file_load_or_name_the_file(scratch, data):
    """Any bytes (not UTF-8, NULs, CRs) as the config file: they load, or one line naming it."""
    path = scratch / "bytes.conf"
    path.write_bytes(data)
    explanation = load_or_explain(["-c", str(path)], environ={})
    assert explanation is None or str(path) in explanation


@fuzz(400)
@given(option=st.sampled_from(OPTIONS), value=st.one_of(values, any_text),
       from_environment=st.booleans())
def test_any_flag_or_environment_value_loads_or_names_its_source(option, value,
                                                                 from_environment):
    """Any value for any flag (as --flag=VALUE) or environment variable: it loads, or one
    ConfigError line naming that flag or variable."""
    flag, variable = option
    if from_environment:
        explanation = load_or_explain(BASE_FLAGS, environ={variable: value})
    else:
        explanation = load_or_explain([*BASE_FLAGS, f"{flag}={value}"], environ={})
    assert explanation is None or (variable if from_environment else flag) in explanation


def test_values_that_broke_the_parser_are_one_line_errors(scratch):
    """The values this fuzzing found crashing load() or exiting with a usage message now give
    one ConfigError line naming where they came from."""
    cases = [  # (flags besides --bind, --destination; environ; what the line names)
        (["--workers=--"], {}, "flag --workers"),  # argparse 3.11 stored [] for "--"
        ([], {"GCONN_LOG_LEVEL": "--"}, "env GCONN_LOG_LEVEL"),
        ([], {"GCONN_ADMIN_INSECURE": "[yes]"}, "GCONN_ADMIN_INSECURE"),  # a usage message
        (["--shed-message=\\q"], {}, "flag --shed-message"),  # a DeprecationWarning
        (["--tls-cert=/"], {}, "flag --tls-cert"),  # IsADirectoryError
        (["--destination-tls=yes", f"--destination-tls-ca={'x' * 300}"], {},
         "flag --destination-tls-ca"),  # name too long: OSError
        (["--admin=a\nb:1"], {}, "flag --admin"),  # the address's newline made two lines
        ([], {"GCONN_ROUTE_NAME": "a b"}, "env GCONN_ROUTE_NAME"),  # was "flag --route-name"
        (["--bind=127.0.0.1:²"], {}, "port must be a number"),  # int("²") failed
    ]
    for argv, environ, named in cases:
        explanation = load_or_explain([*BASE_FLAGS, *argv], environ)
        assert explanation is not None and named in explanation, (argv, environ, explanation)
    # an environment list ConfigArgParse read as empty (GCONN_DESTINATION=[]) left None to join
    assert load_or_explain(BASE_FLAGS, {"GCONN_DESTINATION": "[]"}) is None
    explanation = load_or_explain(["--bind", "127.0.0.1:0"], {"GCONN_DESTINATION": "[]"})
    assert explanation is not None and "no destinations" in explanation
    path = scratch / "dashes.conf"
    path.write_text("[gconn]\nworkers = --\n" + ROUTE)
    assert f"{path}:2" in load_or_explain(["-c", str(path)], environ={})


durations = st.builds(lambda number, unit: f"{number}{unit}",
                      st.one_of(st.integers(0, 10**20), st.sampled_from(["9" * 400, "0.5"])),
                      st.sampled_from(["", "ms", "s", "m", "h", "d"]))
DURATION_SETTINGS = [setting for setting in SETTINGS if "duration" in setting.allowed]


@fuzz(200)
@given(setting=st.sampled_from(DURATION_SETTINGS), value=durations)
def test_every_duration_load_accepts_is_one_a_socket_timeout_takes(setting, value):
    """A duration load() accepts can be a socket timeout (huge ones, even infinite ones, were
    accepted and then raised OverflowError where the daemon used them)."""
    try:
        config, _ = load([*BASE_FLAGS, f"{setting.option}={value}"], environ={})
    except ConfigError:
        return
    seconds = getattr(config.routes[0] if setting.scope != "process" else config.process,
                      setting.attribute)
    with socket.socket() as probe:
        probe.settimeout(seconds or None)


@fuzz(150)
@given(idle=durations, interval=durations, count=st.integers(-1, 200).map(str),
       user_timeout=durations)
def test_keepalive_options_load_accepts_can_be_set_on_a_socket(idle, interval, count,
                                                               user_timeout):
    """The TCP keepalive and user-timeout values load() accepts are ones the kernel takes:
    too large ones passed --check-config and then killed every worker at start."""
    try:
        config, _ = load([*BASE_FLAGS, f"--tcp-keepalive-idle={idle}",
                          f"--tcp-keepalive-interval={interval}",
                          f"--tcp-keepalive-count={count}",
                          f"--tcp-user-timeout={user_timeout}"], environ={})
    except ConfigError:
        return
    with socket.socket() as probe:
        for level, name, number in keepalive_options(config.routes[0]):
            probe.setsockopt(level, name, number)


def test_too_long_durations_are_refused_naming_the_limit():
    """Durations beyond what sockets and the kernel take are config errors naming the limit."""
    for flag, value, limit in [("--idle-timeout", "99999999999999d", "10000d"),
                               ("--connect-timeout", "9" * 400, "10000d"),
                               ("--tcp-keepalive-idle", "32768s", "32767s"),
                               ("--tcp-keepalive-interval", "10h", "32767s"),
                               ("--tcp-user-timeout", "25d", "24d")]:
        explanation = load_or_explain([*BASE_FLAGS, f"{flag}={value}"], environ={})
        assert explanation is not None and flag in explanation and limit in explanation


def run_check_config(args, environ=None):
    """``python -m gconn ARGS --check-config`` with no GCONN_* from this process's environment
    (no admin endpoint, so no port is needed); the CompletedProcess."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GCONN_")}
    env["GCONN_ADMIN"] = ""
    env.update(environ or {})
    return subprocess.run([sys.executable, "-m", "gconn", *args, "--check-config"],
                          capture_output=True, text=True, env=env, timeout=30,
                          stdin=subprocess.DEVNULL)


def assert_exit_0_or_one_line(result):
    """Exit 0 with the config printed and nothing on stderr, or exit 2 with exactly one
    ``gconn: config error:`` line on stderr; never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 0:
        assert result.stderr == "" and "[route:" in result.stdout, result
        return
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gconn: config error: "), result.stderr


no_nul_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                      max_size=40)


@fuzz(6)
@given(text=ini_texts, option=st.sampled_from(OPTIONS),
       value=st.one_of(st.sampled_from(NASTY_VALUES), no_nul_text))
def test_check_config_exits_2_with_one_line_for_any_file_and_flag(scratch, text, option, value):
    """The real command: any config file plus any flag value exits 0 or 2 with one stderr
    line, never a traceback."""
    path = scratch / "check.conf"
    path.write_text(text, encoding="utf-8")
    assert_exit_0_or_one_line(run_check_config(["-c", str(path), f"{option[0]}={value}"]))


@pytest.mark.parametrize("args, environ", [
    (["--loop=kqueue"], {}),
    (["--admin-token-file=/"], {"GCONN_ADMIN": "127.0.0.1:0"}),  # read by cli.py, not load
    (["--workers=--"], {}),
    ([], {"GCONN_ADMIN_INSECURE": "[a, b]"}),
    (["--tls-cert=/"], {}),
    (["--nonexistent-flag"], {}),
    (["--check-config=3"], {}),
    (["--destination"], {}),  # no value: a malformed command line, still one line
], ids=["loop", "token-directory", "dashes", "env-list", "cert-directory", "unknown-flag",
        "switch-with-value", "flag-without-value"])
def test_check_config_rejects_in_one_line(args, environ):
    """Values checked outside load() (loop, token file) and malformed command lines: exit 2,
    one line on stderr."""
    result = run_check_config([*BASE_FLAGS, *args], environ)
    assert result.returncode == 2
    assert_exit_0_or_one_line(result)


# --- shared by the daemon tests --------------------------------------------------------------

def worker_pids(daemon):
    """The pids of the workers the daemon has started so far, from its log."""
    return [int(line.split("pid=")[1].split()[0]) for line in daemon.lines
            if " started pid=" in line]


def read_until_closed(connection):
    """Everything the peer sends until it closes (a reset ends it too)."""
    chunks = []
    try:
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def http(address, request):
    """Send raw ``request`` bytes to host:port and read until the server closes: (status,
    headers dict, body bytes); status None if the server closed without an answer."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=ANSWER_TIMEOUT) as connection:
        connection.sendall(request)
        answer = read_until_closed(connection)
    if not answer:
        return None, {}, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def assert_still_serving(daemon, pids):
    """No worker died or was replaced, the supervisor answers /livez, and nothing printed a
    traceback."""
    assert worker_pids(daemon) == pids
    assert not [line for line in daemon.lines if " finished (" in line]
    for pid in pids:
        os.kill(pid, 0)  # still there
    status, _, body = http(daemon.admin, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body) == (200, b"ok\n")
    assert "Traceback" not in "\n".join(daemon.lines)


@pytest.fixture
def busy_daemon(start_echo, start_daemon, tmp_path):
    """A one-worker daemon whose control socket is under ``tmp_path`` (its TMPDIR), holding two
    live connections so /connections has entries to filter and stacks to show; yields
    (daemon, worker pid, control socket path)."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--bind", "127.0.0.1:0", "--destination",
                          echo.address, env={"TMPDIR": str(tmp_path)})
    clients = [connect(daemon.port()) for _ in range(2)]
    for client in clients:
        client.sendall(b"hello")
        assert client.recv(5) == b"hello"
    (pid,) = worker_pids(daemon)
    (path,) = glob.glob(str(tmp_path / "gconn-control-*" / f"{pid}.sock"))
    yield daemon, pid, path
    for client in clients:
        client.close()


# --- (b) the admin endpoint ------------------------------------------------------------------

ENDPOINTS = ["/livez", "/readyz", "/status", "/connections", "/metrics", "/config"]
PATHS = ENDPOINTS + ["/", "/nope", "/livez/", "//livez", "/LIVEZ", "/livez%00", "/..",
                     "/connections/x", "*", "http://x/livez"]
token_characters = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
methods = st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH",
                                     "OPTIONS", "TRACE", "CONNECT", "get"]),
                    st.text(token_characters, min_size=1, max_size=12))
QUERY_KEYS = ["route", "client", "limit", "offset", "stack"]
QUERY_VALUES = ["", "0", "1", "2", "-1", "1000", "100000", "100001", str(10**12),
                str(10**12 + 1), "9" * 50, "1e3", " 1", "1 ", "0x10", "１", "٣", "yes", "default",
                "127.0.0.1", "nothing", "%", "\0", "é"]
# query pairs /connections accepts: its own keys, values in range
good_pairs = st.one_of(
    st.tuples(st.sampled_from(["limit"]), st.sampled_from(["", "1", "7", "1000", "100000"])),
    st.tuples(st.sampled_from(["offset"]), st.sampled_from(["", "0", "1", "5", str(10**12)])),
    st.tuples(st.sampled_from(["stack"]), st.sampled_from(["", "0", "1"])),
    st.tuples(st.sampled_from(["route", "client"]), st.one_of(st.sampled_from(QUERY_VALUES),
                                                              any_text)),
)
any_pairs = st.tuples(st.one_of(st.sampled_from(QUERY_KEYS), any_text),
                      st.one_of(st.sampled_from(QUERY_VALUES), any_text))
raw_query = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e,
                                  blacklist_characters="#"), max_size=40)


def encode(pairs):
    """``pairs`` as a query string, every byte percent-encoded as a browser would."""
    return "&".join(f"{urllib.parse.quote(key, safe='')}={urllib.parse.quote(value, safe='')}"
                    for key, value in pairs)


@st.composite
def queries(draw):
    """(query string, whether /connections must accept it)."""
    kind = draw(st.sampled_from(["good", "any", "raw", "none"]))
    if kind == "good":
        return encode(draw(st.lists(good_pairs, max_size=5))), True
    if kind == "any":
        return encode(draw(st.lists(any_pairs, max_size=5))), False
    if kind == "raw":
        return draw(raw_query), False
    return None, True


def assert_endpoint_answer(method, path, query_accepted, status, headers, body):
    """What the admin endpoint may answer: the endpoint's normal answer, or a 4xx whose body
    is one line of JSON with an ``error``; never a 5xx but /readyz's 503."""
    assert status is not None, "closed without an answer"
    if method == "HEAD":
        assert body == b"" and (status == 200 or 400 <= status < 500 or
                                (path == "/readyz" and status == 503)), status
        return
    if 400 <= status < 500:
        assert headers["content-type"] == "application/json", (status, headers, body)
        assert body.endswith(b"\n") and body.count(b"\n") == 1, body
        assert isinstance(json.loads(body)["error"], str)
        assert method != "GET" or path not in ENDPOINTS or (path == "/connections" and
                                                            not query_accepted), (status, body)
        return
    assert method == "GET" and path in ENDPOINTS, (method, path, status)
    if path == "/readyz":
        assert (status, body) in ((200, b"ready\n"), (503, body)) and body.startswith(
            (b"ready", b"not ready")), (status, body)
    elif path == "/livez":
        assert (status, body) == (200, b"ok\n")
    elif path == "/metrics":
        assert status == 200 and b"gconn_connections_accepted_total" in body
    else:
        assert status == 200, (status, body)
        answer = json.loads(body)
        if path == "/connections":
            assert isinstance(answer["connections"], list) and answer["total"] >= 0


@pytest.mark.timeout(120)
def test_any_method_and_query_on_the_admin_endpoint_gets_an_answer_never_a_500(busy_daemon):
    """Every admin path with any method and any query string: the endpoint's answer or a 4xx
    with one line of JSON, never a 5xx, never a worker restart."""
    daemon, pid, _ = busy_daemon

    @fuzz(250)
    @given(method=methods, path=st.sampled_from(PATHS), query=queries())
    def request(method, path, query):
        query_text, accepted = query
        target = path if query_text is None else f"{path}?{query_text}"
        status, headers, body = http(
            daemon.admin, f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert_endpoint_answer(method, path, accepted, status, headers, body)

    request()
    status, _, body = http(daemon.admin, b"GET /connections?stack=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body)["total"] == 2  # the held ones, with their stacks
    assert_still_serving(daemon, [pid])


@pytest.mark.timeout(120)
def test_garbage_requests_never_get_a_500_or_stop_the_admin_endpoint(busy_daemon):
    """Raw garbage for a request (bad request lines, bad headers, bodies, binary): a 4xx or a
    close, never a 5xx; the workers and /livez carry on."""
    daemon, pid, _ = busy_daemon
    requests = st.one_of(
        st.binary(max_size=300),
        st.builds(lambda line, rest: line + b"\r\n" + rest + b"\r\n\r\n",
                  st.binary(max_size=80), st.binary(max_size=80)),
        st.builds(lambda method, header, body: (
            f"{method} /connections HTTP/1.1\r\nHost: x\r\n".encode() + header +
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body),
            methods, st.binary(max_size=60), st.binary(max_size=60)),
    )

    @fuzz(100)
    @given(request=requests)
    def send(request):
        if not request.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in request:
            request += b"\r\n\r\n"  # a whole head: else it waits out READ_TIMEOUT
        status, _, _ = http(daemon.admin, request)
        assert status is None or status < 500 or status == 503, status

    send()
    assert_still_serving(daemon, [pid])


# --- (c) a worker's control socket -----------------------------------------------------------

COMMANDS = ["report", "connections", "connections stack", "flush"]
control_messages = st.one_of(
    st.sampled_from([command.encode() + end for command in COMMANDS
                     for end in (b"", b"\n", b"\r\n", b" ", b"\0", b"\n\n")]),
    st.sampled_from([b"REPORT", b" report", b"report report", b"connections  stack",
                     b"connections stacks", b"\xff\xfe", b"x" * 256, b"report" + b" " * 300,
                     b"\n", b"{}", b'{"command": "report"}']),
    st.binary(max_size=600),
    st.text(max_size=80).map(lambda text: text.encode("utf-8", "surrogatepass")),
)


def ask(path, message, half_close):
    """Send ``message`` to the control socket at ``path`` and read until it closes: the bytes
    answered (a reset, after unread garbage, counts as a close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(ANSWER_TIMEOUT)
        connection.connect(path)
        try:
            connection.sendall(message)
            if half_close:
                connection.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and closed before the rest of a long message was sent
        return read_until_closed(connection)


@pytest.mark.timeout(120)
def test_any_bytes_on_the_control_socket_get_an_answer_or_a_close(busy_daemon):
    """Any message on a worker's control socket: its JSON answer, a JSON error, or a close;
    the worker neither dies nor hangs and still answers ``report`` afterwards."""
    daemon, pid, path = busy_daemon

    @fuzz(250)
    @given(message=control_messages, half_close=st.booleans())
    def send(message, half_close):
        if not message and not half_close:
            half_close = True  # nothing sent, nothing ended: it would wait out its timeout
        answer = ask(path, message, half_close)
        if not answer:
            return
        decoded = json.loads(answer)
        command = message.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        if command in ("report", "flush"):
            assert decoded["pid"] == pid
        elif command in ("connections", "connections stack"):
            assert len(decoded) == 2 and all(entry["worker"] == pid for entry in decoded)
        else:
            assert set(decoded) == {"error"}, decoded

    send()
    # a client that connects and never sends is closed after the worker's timeout, not kept
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.settimeout(ANSWER_TIMEOUT)
        silent.connect(path)
        assert silent.recv(1) == b""
    report = json.loads(ask(path, b"report\n", half_close=True))
    assert report["pid"] == pid and report["routes"]["default"]["active"] == 2
    assert_still_serving(daemon, [pid])

