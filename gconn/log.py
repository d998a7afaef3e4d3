"""Logging: the daemon's log (every session line carries its connection id) and the access log.

The access log is one line per finished connection, in logfmt (``key=value``, values with
blanks quoted, control characters escaped as ``\\n``, ``\\x07``: one line whatever a value
holds), so that both people and ``grep``/log shippers read it:

    2026-11-23T13:40:01.123Z conn=7 route=mysql client=127.0.0.1:51234
    destination=10.0.0.5:3306 bytes_up=120 bytes_down=5321 duration=0.042 end=client_closed

(one line in the log).  ``end`` is one of client_closed, destination_closed, idle_timeout,
connect_failed, fd_exhausted, shutdown, error, bad_proxy_header, or a shed reason (queue_full,
queue_timeout, no_destination, blocked_host).  When a PROXY header named the client, ``client``
is the address it carried and ``via`` (after it) the balancer's.  A connection that ended
abnormally (a reset, a failed connect, a timeout, a shed, a shutdown cut, a bug) has a last
field ``error="<what happened>"``, read from its greenlet's error state.
"""

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


def setup(process):
    """Configure (or reopen) the daemon log and the access log from the process settings.

    The new files are opened before the old handlers are let go, so an OSError (raised to the
    caller) leaves the running logs as they were.
    """
    daemon = _handler(process.log_file)
    try:
        access = None if process.access_log == "off" else _handler(process.access_log)
    except OSError:
        daemon.close()
        raise
    daemon.setFormatter(logging.Formatter(DAEMON_FORMAT))
    daemon.addFilter(ContextFilter())
    if access is not None:
        access.setFormatter(logging.Formatter("%(message)s"))
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
    if text and text.isprintable() and not any(c in text for c in ' "='):
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


def access_line(context, end, duration, error=None):
    """The access-log line of a finished connection; ``error`` (why it ended abnormally, from
    its greenlet's error state) is added last when there is one."""
    fields = (("conn", context.id), ("route", context.route), ("client", context.client))
    if context.via:
        fields += (("via", context.via),)
    if context.tls:
        fields += (("tls_version", context.tls[0]), ("tls_cipher", context.tls[1]))
    if context.sni:
        fields += (("sni", context.sni),)
    fields += (
        ("destination", context.destination or "-"), ("bytes_up", context.bytes_up),
        ("bytes_down", context.bytes_down), ("duration", f"{duration:.3f}"), ("end", end),
    )
    if error:
        fields += (("error", error),)
    return format_time(context.started) + " " + " ".join(
        f"{key}={_quoted(value)}" for key, value in fields)


def log_access(context, end, duration, error=None):
    """Write the access-log line of a finished connection, if the access log is on."""
    if not ACCESS.disabled:
        ACCESS.info(access_line(context, end, duration, error))
