"""``gconn status``: a terminal summary per route, read from a running gconn's admin endpoint.

Shows, per route, active/limit, queued, admitted, shed by reason and destinations up/down,
from ``GET /status``.  Exits 0 when it could read the endpoint, 1 when it could not.
"""

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_ADMIN = "127.0.0.1:8421"
TIMEOUT = 5.0  # seconds to wait for the admin endpoint


def fetch(admin, path, token=None, form=None):
    """GET ``path`` from the admin endpoint (POST ``form``, a dict, when given) and decode its
    JSON."""
    data = None if form is None else urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(f"http://{admin}{path}", data=data)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.loads(response.read())


def render(totals):
    """The summary table of ``totals`` (the ``/status`` JSON) as text."""
    lines = [f"gconn: {totals['workers_answering']}/{totals['workers']} workers answering, "
             f"generation {totals['generation']}"]
    header = f"{'route':<16} {'address':<22} {'active/limit':>14} {'queued':>8} " \
             f"{'admitted':>9}  shed  destinations (up/down)"
    lines.append(header)
    for name, route in sorted(totals["routes"].items()):
        shed = ", ".join(f"{reason}={count}" for reason, count in route["shed"].items()
                         if count) or "0"
        destinations = ", ".join(
            f"{address} {entry['up']}/{entry['down']}"
            + ("" if entry.get("state", "ready") == "ready" else f" {entry['state']}")
            for address, entry in route["destinations"].items())
        lines.append(f"{name:<16} {route['address']:<22} "
                     f"{route['active']:>6}/{route['limit']:<7} {route['queued']:>8} "
                     f"{route['admitted']:>9}  {shed}  {destinations}")
        if route.get("top_hosts"):
            lines.append("  top client hosts: " + ", ".join(
                f"{entry['host']}={entry['connections']}" for entry in route["top_hosts"]))
    for entry in totals.get("draining", []):
        hard_stop = "" if entry["hard_stop_in"] is None \
            else f", closed in {entry['hard_stop_in']:g}s (hard-stop-after)"
        lines.append(f"draining: generation {entry['generation']}, {entry['workers']} workers, "
                     f"{entry['connections']} connections{hard_stop}")
    return "\n".join(lines)


def admin_arguments(parser):
    """``--admin`` and ``--token-file``, as every command that talks to the admin takes them."""
    parser.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT",
                        help=f"the admin endpoint (default {DEFAULT_ADMIN})")
    parser.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")


def ask_admin(prog, options, path, form=None):
    """(decoded answer, None) from the admin endpoint, or (None, exit code) with the reason
    printed: 2 for an unreadable token file, 1 when the endpoint could not be read or said
    no (its one-line error shown)."""
    token = None
    if options.token_file:
        try:
            with open(options.token_file, encoding="utf-8") as stream:
                token = stream.read().strip()
        except OSError as error:
            print(f"{prog}: cannot read {options.token_file}: {error.strerror}",
                  file=sys.stderr)
            return None, 2
    try:
        return fetch(options.admin, path, token, form), None
    except urllib.error.HTTPError as error:
        try:
            detail = ": " + json.loads(error.read())["error"]
        except (ValueError, KeyError, TypeError, OSError):
            detail = ""
        print(f"{prog}: {options.admin} answered {error.code}{detail}", file=sys.stderr)
        return None, 1
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        print(f"{prog}: cannot read {options.admin}: {reason}", file=sys.stderr)
        return None, 1


def main(argv=None):
    """The ``gconn status`` command."""
    parser = argparse.ArgumentParser(prog="gconn status", description=__doc__.splitlines()[0])
    admin_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    options = parser.parse_args(argv)
    totals, code = ask_admin("gconn status", options, "/status")
    if totals is None:
        return code
    print(json.dumps(totals, indent=2) if options.json else render(totals))
    return 0
