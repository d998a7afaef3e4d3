"""Log formats: log-format = text | json for the daemon log, access-log-format = logfmt | json
for the access log.  A record is one line in its format whatever its values hold (a text
traceback aside), the JSON lines carry the same fields as the text ones, and a reopen (USR1)
and a reload (HUP) keep the chosen format.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import CHUNK, LINE_TIMEOUT, connect, stop_gracefully

from gconn import log
from gconn.local import ConnectionContext
from gconn.log import (
    ACCESS_RENDERERS,
    DAEMON_FORMATTERS,
    JsonFormatter,
    _quoted,
    access_fields,
    json_line,
    logfmt_line,
    parse_fields,
)
from gconn.settings import ACCESS_LOG_FORMATS, LOG_FORMATS

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")  # ISO 8601 UTC, milliseconds
DAEMON_KEYS = {"time", "level", "logger", "pid", "conn", "message"}  # on every daemon line
DAEMON_OPTIONAL = {"exception", "stack"}  # only on a record that has them
ACCESS_KEYS = {"time", "conn", "route", "client", "destination", "bytes_up", "bytes_down",
               "duration", "end"}  # on every access line; via, tls_*, sni, error when present
PAYLOAD = bytes(range(256)) * 256 + b"odd"  # 65,539 bytes: every byte value, not chunk-aligned
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) "
                       r"gconn\[\d+\] conn=\S+ ")  # today's daemon line, DAEMON_FORMAT
AWKWARD = ["plain", "with blank", "line\nbreak", "carriage\rreturn", "tab\there", 'a "quote"',
           "back\\slash and blank", "\\n written out", "bell\x07", "line\u2028separator",
           "lone \udcff surrogate", "é ü", "", "key=value"]


def full_context():
    """A finished connection's context with every optional field set."""
    context = ConnectionContext("3-7", "web", "192.0.2.1:51234", started=1795354801.5)
    context.via = "127.0.0.1:40000"
    context.tls = ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    context.sni = "db.example"
    context.destination = "10.0.0.5:3306"
    context.bytes_up, context.bytes_down = 120, 5321
    return context


# pure: the formatters -----------------------------------------------------------------------

@pytest.mark.parametrize("value", AWKWARD, ids=[repr(value) for value in AWKWARD])
def test_logfmt_value_is_one_line_and_reads_back(value):
    """A logfmt value with control characters is escaped onto one line; parse_fields undoes it."""
    line = f"2026-11-23T13:40:01.123Z conn=7 error={_quoted(value)} end=error"
    assert line.isprintable(), line
    assert parse_fields(line) == {"conn": "7", "error": value, "end": "error"}


ERRORS = [value for value in AWKWARD if value]  # an empty error is no error: no error= field


@pytest.mark.parametrize("error", ERRORS, ids=[repr(value) for value in ERRORS])
def test_json_access_line_has_the_logfmt_fields_as_values(error):
    """The JSON access line has every logfmt key and value, numbers as numbers, on one line."""
    fields = access_fields(full_context(), "client_closed", 0.0419, error)
    text, data = logfmt_line(fields), json_line(fields)
    assert text.isprintable() and data.isprintable() and data.isascii(), (text, data)
    logfmt, decoded = parse_fields(text), json.loads(data)
    assert text.startswith(decoded.pop("time") + " ")
    assert list(decoded) == list(logfmt)  # the same keys, in the same order
    assert decoded == {**logfmt, "bytes_up": 120, "bytes_down": 5321, "duration": 0.042}
    assert decoded["error"] == error


def test_json_access_line_without_a_destination_has_null_and_leaves_out_absent_fields():
    """No destination: null where logfmt writes -; via, tls, sni and error are left out."""
    context = ConnectionContext("7", "web", "192.0.2.1:51234")
    decoded = json.loads(json_line(access_fields(context, "no_destination", 0.0)))
    assert set(decoded) == ACCESS_KEYS and decoded["destination"] is None
    assert TIME.match(decoded["time"]) and decoded["duration"] == 0
    assert "destination=- " in logfmt_line(access_fields(context, "no_destination", 0.0))


def test_daemon_json_line_escapes_a_newline_and_carries_the_exception():
    """A message with a newline and a traceback make one JSON line with both in full."""
    try:
        raise ValueError("a bad\nvalue")
    except ValueError:
        record = logging.getLogger("gconn.session").makeRecord(
            "gconn.session", logging.ERROR, __file__, 1, "session failed:\n%s", ("two\rlines",),
            sys.exc_info(), extra={"conn": "2-9"})
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line and line.isprintable()
    decoded = json.loads(line)
    assert set(decoded) == DAEMON_KEYS | {"exception"}
    assert decoded["message"] == "session failed:\ntwo\rlines"
    assert decoded["exception"].startswith("Traceback (most recent call last):")
    assert decoded["exception"].endswith("ValueError: a bad\nvalue")
    assert decoded["level"] == "ERROR" and decoded["logger"] == "gconn.session"
    assert decoded["pid"] == os.getpid() and decoded["conn"] == "2-9"
    assert TIME.match(decoded["time"])


def test_daemon_text_line_escapes_a_newline_in_its_message():
    """Today's text line, its message escaped onto one line; a traceback follows it."""
    try:
        raise ValueError("a bad value")
    except ValueError:
        record = logging.getLogger("gconn.session").makeRecord(
            "gconn.session", logging.ERROR, __file__, 1, "forged\n%s", ("2026 INFO fake",),
            sys.exc_info(), extra={"conn": "2-9"})
    first, *traceback = DAEMON_FORMATTERS["text"]().format(record).split("\n")
    assert TEXT_LINE.match(first) and first.endswith(" conn=2-9 forged\\n2026 INFO fake")
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-1] == "ValueError: a bad value"


def test_daemon_json_line_outside_a_connection_has_conn_null_and_no_exception():
    """A record logged outside any connection (conn -) has conn null and no exception key."""
    record = logging.makeLogRecord({"name": "gconn", "levelno": logging.INFO,
                                    "levelname": "INFO", "msg": "ready", "conn": "-"})
    decoded = json.loads(JsonFormatter().format(record))
    assert set(decoded) == DAEMON_KEYS and decoded["conn"] is None


def test_every_format_setting_value_has_a_formatter():
    """Each value log-format and access-log-format accept has its formatter, and no other."""
    assert set(DAEMON_FORMATTERS) == set(LOG_FORMATS)
    assert set(ACCESS_RENDERERS) == set(ACCESS_LOG_FORMATS)
    assert ACCESS_RENDERERS["logfmt"] is log.logfmt_line


# real: gconn and gconn-echo as processes --------------------------------------------------

def complete_lines(path):
    """The lines of ``path`` written to the end (a last line still being written is left)."""
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read().split("\n")[:-1]
    except FileNotFoundError:
        return []


def wait_record(daemon, paths, predicate, timeout=LINE_TIMEOUT):
    """(path, record): the first JSON line of one of ``paths`` for which ``predicate`` holds,
    waiting for gconn to write it."""
    deadline = time.monotonic() + timeout
    while True:
        for path in paths:
            for line in complete_lines(path):
                try:
                    record = json.loads(line)
                except ValueError:
                    raise AssertionError(f"not JSON in {path}: {line!r}") from None
                if predicate(record):
                    return path, record
        if daemon.popen.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no expected line in {paths}; gconn output: {daemon.lines}")
        time.sleep(0.02)


def message_starts(text):
    """A predicate: the daemon record's message starts with ``text``."""
    return lambda record: record["message"].startswith(text)


def from_client(client):
    """A predicate: the access record is the connection from ``client`` (host:port)."""
    return lambda record: record["client"] == client


def roundtrip(port):
    """Send PAYLOAD through gconn to the echo and check it comes back; the client's address."""
    with connect(port) as connection:
        host, client_port = connection.getsockname()
        connection.sendall(PAYLOAD)
        connection.shutdown(socket.SHUT_WR)
        received = b"".join(iter(lambda: connection.recv(CHUNK), b""))
    assert received == PAYLOAD
    return f"{host}:{client_port}"


def test_json_logs_parse_line_by_line_through_a_reopen_and_a_reload(start_daemon, start_echo,
                                                                    tmp_path):
    """log-format and access-log-format json: every line of both logs, before and after a
    USR1 reopen and a HUP reload, is a JSON object with the documented keys, and the access
    line counts the bytes the echo verified."""
    echo = start_echo()
    daemon_log, access_log = tmp_path / "daemon.log", tmp_path / "access.log"
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address,
                          "--workers", "1", "--log-format", "json", "--access-log-format",
                          "json", "--log-file", str(daemon_log), "--access-log", str(access_log),
                          wait=False)
    wait_record(daemon, [daemon_log], message_starts("ready workers=1 generation=0"))
    _, started = wait_record(daemon, [daemon_log], message_starts("worker 0 started pid="))
    first_worker = started["message"].split("pid=")[1].split()[0]
    _, listening = wait_record(daemon, [daemon_log], message_starts("listening route=default"))
    port = int(listening["message"].rsplit(":", 1)[1])

    client = roundtrip(port)
    _, line = wait_record(daemon, [access_log], from_client(client))
    assert line["bytes_up"] == line["bytes_down"] == len(PAYLOAD)
    assert line["destination"] == echo.address and line["end"] == "client_closed"
    assert line["route"] == "default" and isinstance(line["duration"], float | int)

    # rotate both logs, then USR1: the supervisor and the worker reopen them, still in JSON
    os.rename(daemon_log, tmp_path / "daemon.log.1")
    os.rename(access_log, tmp_path / "access.log.1")
    daemon.signal(signal.SIGUSR1)
    rotated = [access_log, tmp_path / "access.log.1"]
    for _ in range(100):  # the worker reopens when its USR1 arrives: until then, the old file
        client = roundtrip(port)
        path, _ = wait_record(daemon, rotated, from_client(client))
        if path == access_log:
            break
    else:
        raise AssertionError("the worker never reopened the access log after USR1")

    # HUP: the supervisor sets the logs up again and the new worker writes JSON to them
    daemon.signal(signal.SIGHUP)
    wait_record(daemon, [daemon_log], message_starts("ready workers=1 generation=1"))
    wait_record(daemon, [daemon_log], message_starts(f"worker 0 pid={first_worker} finished"))
    client = roundtrip(port)
    wait_record(daemon, [access_log], from_client(client))
    assert stop_gracefully(daemon) == 0

    assert daemon.lines == []  # nothing went to stderr: no handler error, no stray print
    daemon_lines = complete_lines(daemon_log) + complete_lines(tmp_path / "daemon.log.1")
    access_lines = complete_lines(access_log) + complete_lines(tmp_path / "access.log.1")
    assert len(access_lines) >= 3 and len(daemon_lines) >= 10
    for text in daemon_lines:
        record = json.loads(text)
        assert isinstance(record, dict), text
        assert DAEMON_KEYS <= set(record) <= DAEMON_KEYS | DAEMON_OPTIONAL, text
        assert TIME.match(record["time"]) and isinstance(record["pid"], int), text
        assert record["logger"].startswith("gconn"), text
    assert any(json.loads(text)["message"].startswith("reloading")
               for text in complete_lines(daemon_log))
    for text in access_lines:
        record = json.loads(text)
        assert isinstance(record, dict) and set(record) == ACCESS_KEYS, text
        assert TIME.match(record["time"]), text
        assert record["bytes_up"] == record["bytes_down"] == len(PAYLOAD), text


def test_default_formats_are_todays_text_and_logfmt(start_daemon, start_echo):
    """Without the settings the daemon log is today's text line and the access log logfmt."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address)
    client = roundtrip(daemon.port())
    line = daemon.wait_contains(f" client={client} ")
    fields = parse_fields(line)
    assert TIME.match(line.split(" ", 1)[0])
    assert fields["bytes_up"] == fields["bytes_down"] == str(len(PAYLOAD))
    assert fields["end"] == "client_closed" and fields["destination"] == echo.address
    listening = daemon.wait_contains("listening route=default")
    assert TEXT_LINE.match(listening), listening


def test_access_log_format_from_the_environment(start_daemon, start_echo):
    """GCONN_ACCESS_LOG_FORMAT=json makes the access lines JSON beside a text daemon log."""
    echo = start_echo()
    daemon = start_daemon("--bind", "127.0.0.1:0", "--destination", echo.address,
                          env={"GCONN_ACCESS_LOG_FORMAT": "json"})
    client = roundtrip(daemon.port())
    line = daemon.wait_contains(f'"client":"{client}"')
    record = json.loads(line)
    assert set(record) == ACCESS_KEYS and record["bytes_up"] == len(PAYLOAD)
    assert TEXT_LINE.match(daemon.wait_contains("listening route=default"))


@pytest.mark.parametrize("key, value, allowed", [
    ("log-format", "yaml", "text, json"),
    ("access-log-format", "clf", "logfmt, json"),
])
def test_a_bad_format_is_a_config_error_naming_key_value_and_choices(tmp_path, key, value,
                                                                       allowed):
    """A bad log-format or access-log-format: exit 2, one line naming file:line, key, value and
    the allowed values."""
    path = tmp_path / "bad.conf"
    path.write_text(f"[gconn]\n{key} = {value}\n[route:a]\nbind = 127.0.0.1:0\n"
                    "destinations = 127.0.0.1:9\n")
    env = {name: text for name, text in os.environ.items() if not name.startswith("GCONN_")}
    result = subprocess.run([sys.executable, "-m", "gconn", "-c", str(path), "--check-config"],
                            capture_output=True, text=True, env=env, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{path}:2" in lines[0] and key in lines[0] and repr(value) in lines[0], lines
    assert lines[0].endswith("allowed: " + allowed), lines
