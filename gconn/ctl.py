"""``gconn ctl``: change a running gconn through its admin endpoint (HAProxy's runtime API).

    gconn ctl drain ROUTE DESTINATION        no new connections; live ones go on
    gconn ctl maint ROUTE DESTINATION [--grace 30s]
                                             no new connections; live ones end after grace
    gconn ctl ready ROUTE DESTINATION        serve again
    gconn ctl weight ROUTE DESTINATION N     its share of new connections (0-256)
    gconn ctl unblock ROUTE HOST             lift a blocked client host now

Each is one POST to ``--admin`` (with ``--token-file`` when the admin needs a token), applied
in every worker; a change of state or weight is kept over reloads (and restarts, with
``state-file``).  Exits 0 when every worker took it, 1 otherwise, 2 for bad arguments.
"""

import argparse
import json
import sys
import urllib.parse

from .status import admin_arguments, ask_admin


def main(argv=None):
    """The ``gconn ctl`` command."""
    parser = argparse.ArgumentParser(prog="gconn ctl", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    admin_arguments(parser)
    parser.add_argument("action", choices=("drain", "maint", "ready", "weight", "unblock"))
    parser.add_argument("route")
    parser.add_argument("target", help="the destination (as in the config), or the host")
    parser.add_argument("weight", nargs="?", help="with weight: 0-256")
    parser.add_argument("--grace", default="0", help="with maint: how long live connections "
                                                     "may go on (default 0)")
    options = parser.parse_args(argv)
    if (options.action == "weight") != (options.weight is not None):
        parser.error("weight takes N, and only weight does")
    quoted = f"{urllib.parse.quote(options.route, safe='')}/" \
             f"{urllib.parse.quote(options.target, safe='')}"
    if options.action == "unblock":
        path, form = f"/unblock/{quoted}", {}
    elif options.action == "weight":
        path, form = f"/destinations/{quoted}", {"weight": options.weight}
    else:
        path, form = f"/destinations/{quoted}", {"state": options.action}
        if options.action == "maint":
            form["grace"] = options.grace
    answer, code = ask_admin("gconn ctl", options, path, form)
    if answer is None:
        return code
    print(json.dumps(answer))
    errors = [a["error"] for a in answer.get("answers", []) if "error" in a]
    if errors or not answer.get("workers"):
        print(f"gconn ctl: not applied everywhere: {errors or 'no worker answered'}",
              file=sys.stderr)
        return 1
    return 0
