"""Documentation derived from the settings registry: the example config and README's table.

Everything rendered here comes from ``settings.SETTINGS``, so the docs cannot drift from the
options (tests/test_config.py compares them).  Rendering is pure; the only I/O is rewriting the
text between two marker lines of a file, which tools/bench.py also uses for README's
Performance table.  Regenerate both after changing a setting::

    python -m gconn.docs > conf/gconn.conf && python -m gconn.docs --readme README.rst
"""

import sys

from .settings import PROCESS, PROCESS_SETTINGS, ROUTE, ROUTE_ONLY, ROUTE_SETTINGS, SETTINGS

EXAMPLE_ROUTE = (  # the route of the example config: gconn-echo backends a newcomer can start
    ("bind", "127.0.0.1:6446"),
    ("destinations", "127.0.0.1:9001, 127.0.0.1:9002"),
    ("strategy", "round-robin"),
)
COMMENT_WIDTH = 96  # characters per comment line of the example config
TABLE_START = ".. options-table-start"  # README.rst's lines around the option table
TABLE_END = ".. options-table-end"


def _comment(text, width=COMMENT_WIDTH):
    """``text`` as ``; ``-prefixed lines no wider than ``width``."""
    lines, line = [], ";"
    for word in text.split():
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = ";"
        line += " " + word
    return lines + [line]


def render_example_config():
    """The annotated conf/gconn.conf: every option with its help and default."""
    out = ["; gconn example configuration, generated from gconn/settings.py: do not edit by hand;",
           "; regenerate with: python -m gconn.docs > conf/gconn.conf",
           "; Start two echo backends first:",
           ";   gconn-echo --bind 127.0.0.1:9001 --bind 127.0.0.1:9002",
           "; then: gconn -c conf/gconn.conf   and try: nc 127.0.0.1 6446",
           "; Precedence: --flag > GCONN_* environment > this file > built-in default.",
           "; Durations: 250ms 5s 2m 8h; sizes: 4096 64k 1m.",
           "", "[gconn]", "; process-wide settings", ""]
    for setting in PROCESS_SETTINGS:
        out += _comment(f"{setting.help} ({setting.allowed})")
        out += [f"{setting.name} = {setting.default}", ""]
    out += ["; route options given here are the default for every route:", ""]
    for setting in ROUTE_SETTINGS:
        if setting.scope == ROUTE:
            out += _comment(f"{setting.help} ({setting.allowed})")
            out += [f";{setting.name} = {setting.default}", ""]
    out += ["[route:echo]", "; one section per route: [route:NAME]", ""]
    values = dict(EXAMPLE_ROUTE)
    for setting in ROUTE_SETTINGS:
        if setting.name in values:
            out += _comment(f"{setting.help} ({setting.allowed})")
            out += [f"{setting.name} = {values[setting.name]}", ""]
    return "\n".join(out)


def render_option_table():
    """README.rst's option table (reStructuredText list-table)."""
    rows = [".. list-table:: Options (config key, flag, environment variable)",
            "   :header-rows: 1", "",
            "   * - key", "     - where", "     - flag / environment", "     - default",
            "     - meaning"]
    where = {PROCESS: "[gconn]", ROUTE: "route or [gconn]", ROUTE_ONLY: "route"}
    for setting in SETTINGS:
        rows += [f"   * - ``{setting.name}``", f"     - {where[setting.scope]}",
                 f"     - ``{setting.option}`` / ``{setting.env}``",
                 f"     - {setting.default if setting.default is not None else '(required)'}",
                 f"     - {setting.help}"]
    return "\n".join(rows) + "\n"


def rewrite_between_markers(path, start, end, body):
    """Replace what stands between the lines ``start`` and ``end`` of a text file."""
    with open(path, encoding="utf-8") as stream:
        text = stream.read()
    head, _, rest = text.partition(start + "\n")
    _, _, tail = rest.partition(end + "\n")
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(f"{head}{start}\n\n{body}\n{end}\n{tail}")


def rewrite_readme_table(path):
    """Replace README.rst's option table (between its markers) with the rendered one."""
    rewrite_between_markers(path, TABLE_START, TABLE_END, render_option_table())


def main(argv):
    """Print the example config, or with ``--readme PATH`` rewrite PATH's option table."""
    if argv[:1] == ["--readme"]:
        rewrite_readme_table(argv[1])
    else:
        print(render_example_config(), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
