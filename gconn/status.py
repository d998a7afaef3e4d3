"""``gconn status``: a terminal summary per route, read from a running gconn's admin endpoint.

Shows, per route, active/limit, queued, admitted, shed by reason and destinations up/down,
from ``GET /status``.  Exits 0 when it could read the endpoint, 1 when it could not.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

DEFAULT_ADMIN = "127.0.0.1:8421"
TIMEOUT = 5.0  # seconds to wait for the admin endpoint


def fetch(admin, path, token=None):
    """GET ``path`` from the admin endpoint and decode its JSON."""
    request = urllib.request.Request(f"http://{admin}{path}")
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
            for address, entry in route["destinations"].items())
        lines.append(f"{name:<16} {route['address']:<22} "
                     f"{route['active']:>6}/{route['limit']:<7} {route['queued']:>8} "
                     f"{route['admitted']:>9}  {shed}  {destinations}")
        if route.get("top_hosts"):
            lines.append("  top client hosts: " + ", ".join(
                f"{entry['host']}={entry['connections']}" for entry in route["top_hosts"]))
    return "\n".join(lines)


def main(argv=None):
    """The ``gconn status`` command."""
    parser = argparse.ArgumentParser(prog="gconn status", description=__doc__.splitlines()[0])
    parser.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT",
                        help=f"the admin endpoint (default {DEFAULT_ADMIN})")
    parser.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    options = parser.parse_args(argv)
    token = None
    if options.token_file:
        try:
            with open(options.token_file, encoding="utf-8") as stream:
                token = stream.read().strip()
        except OSError as error:
            print(f"gconn status: cannot read {options.token_file}: {error.strerror}",
                  file=sys.stderr)
            return 2
    try:
        totals = fetch(options.admin, "/status", token)
    except urllib.error.HTTPError as error:
        print(f"gconn status: {options.admin} answered {error.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        print(f"gconn status: cannot read {options.admin}: {reason}", file=sys.stderr)
        return 1
    print(json.dumps(totals, indent=2) if options.json else render(totals))
    return 0
