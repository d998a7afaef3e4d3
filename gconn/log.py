"""Logging: the daemon's log (every session line carries its connection id) and the access log.

The access log is one line per finished connection, in logfmt (``key=value``, values with
blanks quoted, control characters escaped as ``\\n``, ``\\x07``: one line whatever a value
holds), so that both people and ``grep``/log shippers read it:

    2026-11-23T13:40:01.123Z conn=7 route=mysql client=127.0.0.1:51234
    destination=10.0.0.5:3306 bytes_up=120 bytes_down=5321 duration=0.042 end=client_closed

(one line in the log).  ``end`` is one of client_closed, destination_closed, idle_timeout,
fin_timeout, max_lifetime, connect_failed, fd_exhausted, shutdown, error, bad_proxy_header,
maint, destination_down, primary_up, or a shed reason (queue_full, queue_timeout,
no_destination, blocked_host, ...).  When a PROXY header named the client, ``client`` is the
address it carried and ``via`` (after it) the balancer's.  A connection that ended abnormally
(a reset, a failed connect, a timeout, a shed, a shutdown cut, a bug) has a last field
``error="<what happened>"``, read from its greenlet's error state.

``access-log-format = json`` writes the same fields as one JSON object per line instead (the
time as ``"time"``, numbers as numbers, no ``-`` placeholder: a connection without a
destination has ``"destination": null``; via, tls_*, sni and error are left out when absent,
as in logfmt), and ``log-format = json`` does the same for the daemon log (time, level,
logger, pid, conn, message, and exception when there is one).  Either way, one record is one
line: JSON escapes control characters, logfmt quotes and escapes them, and the daemon's text
line escapes them in its message (only a traceback, in text, takes lines of its own).
"""

import json
import logging
import re
import sys
import time

from .local import ContextFilter

LOGGER = logging.getLogger("gconn")
ACCESS = logging.getLogger("gconn.access")
DAEMON_FORMAT = "%(asctime)s %(levelname)s gconn[%(process)d] conn=%(conn)s %(message)s"


def _handler(destination):
    """A handler writing to stderr for ``-``, else appending to the file ``destination``."""
    if destination == "-":
        return logging.StreamHandler(sys.stderr)
    return logging.FileHandler(destination, encoding="utf-8")


class TextFormatter(logging.Formatter):
    """The daemon log's text line (DAEMON_FORMAT) with the message's control characters
    escaped, so that a message, whatever text it quotes, is one line; a traceback still
    follows on lines of its own, as Python prints it."""

    def __init__(self):
        super().__init__(DAEMON_FORMAT)

    def formatMessage(self, record):
        """The line before any traceback (``format`` has just set ``record.message``)."""
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """The daemon log as one JSON object per record: time (ISO 8601 UTC), level, logger, pid,
    conn (null outside a connection), message, and exception (its traceback) and stack when
    the record has them."""

    def format(self, record):
        """The record's JSON line (control characters and non-ASCII escaped: one line)."""
        conn = getattr(record, "conn", "-")
        fields = {"time": format_time(record.created), "level": record.levelname,
                  "logger": record.name, "pid": record.process,
                  "conn": None if conn == "-" else conn, "message": record.getMessage()}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["exception"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return _encode_json(fields)


class AccessFormatter(logging.Formatter):
    """Writes an access record, whose message is the fields dict of ``access_fields``, with
    ``render`` (``logfmt_line`` or ``json_line``)."""

    def __init__(self, render):
        super().__init__()
        self.render = render

    def format(self, record):
        """The access line of the record's fields."""
        return self.render(record.msg)


def setup(process):
    """Configure (or reopen) the daemon log and the access log from the process settings:
    where each goes, the daemon's level, and each one's format.

    The new files are opened before the old handlers are let go, so an OSError (raised to the
    caller) leaves the running logs as they were.
    """
    daemon = _handler(process.log_file)
    try:
        access = None if process.access_log == "off" else _handler(process.access_log)
    except OSError:
        daemon.close()
        raise
    daemon.setFormatter(DAEMON_FORMATTERS[process.log_format]())
    daemon.addFilter(ContextFilter())
    if access is not None:
        access.setFormatter(AccessFormatter(ACCESS_RENDERERS[process.access_log_format]))
    for logger, handler in ((LOGGER, daemon), (ACCESS, access)):
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        if handler is not None:
            logger.addHandler(handler)
        logger.propagate = False
    LOGGER.setLevel(process.log_level.upper())
    ACCESS.setLevel(logging.INFO)
    ACCESS.disabled = access is None


def escape_controls(text):
    """``text`` with every non-printable character (newline, carriage return, tab, other
    control characters, line separators, lone surrogates) written as a backslash escape, so
    that it stays on one line; printable text, non-ASCII included, is left as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _ESCAPES.get(c) or _hex_escape(c) for c in text)


def _hex_escape(character):
    """``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN`` for one character, as Python writes it."""
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


def _quoted(value):
    """A logfmt value: bare when it is printable without blanks, quotes or ``=``, else
    double-quoted with backslash, quote and non-printable characters escaped (one line, always)."""
    text = str(value)
    # plain tests, not any() over a generator: 1.1 us against 3.0 for a line's seven values
    if text and text.isprintable() and " " not in text and '"' not in text and "=" not in text:
        return text
    return '"' + escape_controls(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
_ESCAPED = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)", re.DOTALL)


def _unescape(match):
    """The character one backslash escape of ``_quoted`` stands for."""
    code = match.group(1)
    if len(code) > 1:
        return chr(int(code[1:], 16))
    return _UNESCAPES.get(code, code)


def parse_fields(line):
    """The ``key=value`` fields of an access-log line, quoted values unquoted (the reverse of
    ``_quoted``): for tools that read the access log, such as gconn-soak."""
    return {key: _ESCAPED.sub(_unescape, value[1:-1]) if value.startswith('"') else value
            for key, value in _FIELD.findall(line)}


def format_time(epoch_seconds):
    """ISO 8601 UTC with milliseconds."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_seconds))
    return f"{whole}.{int(epoch_seconds % 1 * 1000):03d}Z"


def access_fields(context, end, duration, error=None):
    """The access-log fields of a finished connection, in line order, as a new dict: numbers
    as numbers, ``destination`` None when none was chosen; ``via``, ``tls_version`` and
    ``tls_cipher``, ``sni`` and ``error`` (why it ended abnormally, from its greenlet's error
    state) only when it has them."""
    fields = {"time": format_time(context.started), "conn": context.id,
              "route": context.route, "client": context.client}
    if context.via:
        fields["via"] = context.via
    if context.tls:
        fields["tls_version"], fields["tls_cipher"] = context.tls
    if context.sni:
        fields["sni"] = context.sni
    fields["destination"] = context.destination or None
    fields["bytes_up"] = context.bytes_up
    fields["bytes_down"] = context.bytes_down
    fields["duration"] = round(duration, 3)  # seconds, to the millisecond
    fields["end"] = end
    if error:
        fields["error"] = error
    return fields


def _logfmt_value(value):
    """A field's logfmt text: None as ``-``, a float with three decimals, else ``_quoted``."""
    if value is None:
        return "-"
    if type(value) is float:
        return f"{value:.3f}"
    return _quoted(value)


def logfmt_line(fields):
    """The logfmt access line of ``access_fields``: the time, then ``key=value`` each."""
    items = iter(fields.items())
    _, stamp = next(items)
    return stamp + " " + " ".join(f"{key}={_logfmt_value(value)}" for key, value in items)


# compact separators: the line is for machines; the C encoder escapes every control and
# non-ASCII character, so a value can never break the line or the handler's encoding.  From
# access_fields to text, timeit, one run, one context (CPython 3.11): json 4.8 us, logfmt
# 4.7 us (with via, tls, sni and error: 5.7 and 6.5 us); logfmt before access_fields 6.5 us
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def json_line(fields):
    """The JSON access line of ``access_fields``: one object, the same keys."""
    return _encode_json(fields)


def access_line(context, end, duration, error=None):
    """The logfmt access-log line of a finished connection (as written by default)."""
    return logfmt_line(access_fields(context, end, duration, error))


def log_access(context, end, duration, error=None):
    """Write the access-log line of a finished connection, if the access log is on, in the
    access-log-format (the record's message is the fields dict; AccessFormatter renders it)."""
    if not ACCESS.disabled:
        ACCESS.info(access_fields(context, end, duration, error))


DAEMON_FORMATTERS = {"text": TextFormatter, "json": JsonFormatter}  # log-format
ACCESS_RENDERERS = {"logfmt": logfmt_line, "json": json_line}  # access-log-format
