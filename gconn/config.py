"""Load and validate gconn's configuration into immutable values, remembering where each came from.

Precedence: command-line flag > ``GCONN_*`` environment > config file > built-in default.  A route
option given as a flag or in the environment applies to every route; ``--bind`` with
``--destination`` adds one route (named by ``--route-name``).  Everything here is pure: it reads
the config file's text and never opens a socket.  Every error is a ConfigError naming the file,
line, key, value and what is allowed.
"""

import dataclasses
import ipaddress
import os
import re

import configargparse

from . import __version__
from .errors import ConfigError
from .settings import (
    BY_NAME,
    PROCESS,
    PROCESS_SETTINGS,
    ROUTE,
    ROUTE_ONLY,
    ROUTE_SETTINGS,
    SETTINGS,
)

DEFAULT_ROUTE_NAME = "default"  # the route made of --bind and --destination
_SECTION = re.compile(r"^\[\s*([^\]]+?)\s*\]$")
_ROUTE_SECTION = re.compile(r"^route\s*:\s*")
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_INLINE_COMMENT = re.compile(r"\s[;#].*$")

ProcessConfig = dataclasses.make_dataclass(
    "ProcessConfig", [(s.attribute, object) for s in PROCESS_SETTINGS], frozen=True)
RouteConfig = dataclasses.make_dataclass(
    "RouteConfig", [("name", str)] + [(s.attribute, object) for s in ROUTE_SETTINGS], frozen=True)


@dataclasses.dataclass(frozen=True)
class Value:
    """One setting's effective text and where it came from (default, path:line, env, flag)."""

    text: str
    source: str


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole validated configuration: process settings, routes, and each value's origin."""

    path: str | None
    process: object  # ProcessConfig
    routes: tuple  # of RouteConfig, in file order, the command-line route last
    values: dict  # section name -> {key: Value}; sections "gconn" and "route:NAME"

    def render(self):
        """The effective config as INI text, each value annotated with where it came from."""
        lines = []
        for section, values in self.values.items():
            lines.append(f"[{section}]")
            width = max(len(f"{key} = {value.text}") for key, value in values.items())
            for key, value in values.items():
                lines.append(f"{key} = {value.text}".ljust(width) + f"    ; {value.source}")
            lines.append("")
        return "\n".join(lines)


@dataclasses.dataclass
class _Section:
    name: str
    line: int
    entries: dict  # key -> (text, line)


def build_parser(prog="gconn"):
    """The command-line parser: every setting as a flag and environment variable, plus actions."""
    parser = configargparse.ArgParser(
        prog=prog, description="gconn: a TCP connection router on gevent greenlets.",
        formatter_class=configargparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-c", "--config", env_var="GCONN_CONFIG", metavar="FILE",
                        help="INI config file with [gconn] and [route:NAME] sections")
    parser.add_argument("--check-config", action="store_true",
                        help="validate, print the effective config with its origins, exit")
    parser.add_argument("--version", action="version", version=f"gconn {__version__}")
    parser.add_argument("--route-name", env_var="GCONN_ROUTE_NAME", default=None,
                        help=f"name of the route given by --bind (default {DEFAULT_ROUTE_NAME})")
    for setting in SETTINGS:
        switch = {"nargs": "?", "const": setting.bare} if setting.bare else {}
        parser.add_argument(
            setting.option, dest=setting.attribute, env_var=setting.env, default=None,
            action="append" if setting.repeatable else "store", metavar=setting.allowed,
            help=setting.help + (f" (default {setting.default})" if setting.default else ""),
            **switch)
    return parser


def read_ini(path):
    """Read an INI file into sections with line numbers; raise ConfigError on unreadable text."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as error:
        raise ConfigError(f"cannot read config file: {error.strerror}", source=path) from None
    except UnicodeDecodeError:
        raise ConfigError("config file is not UTF-8 text", source=path) from None
    sections = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _INLINE_COMMENT.sub("", raw).strip()
        if not line or line[0] in ";#":
            continue
        header = _SECTION.match(line)
        if header:
            sections.append(_Section(_ROUTE_SECTION.sub("route:", header.group(1)), number, {}))
            continue
        key, equals, value = line.partition("=")
        source = f"{path}:{number}"
        if not equals or not key.strip():
            raise ConfigError(f"expected 'key = value', got {raw.strip()!r}", source=source)
        if not sections:
            raise ConfigError(f"key {key.strip()!r} before any [section]", source=source)
        key = key.strip().lower()
        if key in sections[-1].entries:
            raise ConfigError("key given twice in one section", source=source, key=key,
                              section=sections[-1].name)
        sections[-1].entries[key] = (value.strip(), number)
    return sections


def _check(setting, text, source, section):
    """Parse ``text`` for ``setting`` or raise a ConfigError naming all that went in."""
    try:
        return setting.parse(text)
    except ValueError as error:
        raise ConfigError(f"bad value {text!r}: {error}", source=source, key=setting.name,
                          section=section) from None


def _command_line_values(namespace, sources):
    """{setting name: Value} for every setting given as a flag or in the environment."""
    from_env = sources.get("environment_variables", {})
    given = {}
    for setting in SETTINGS:
        raw = getattr(namespace, setting.attribute)
        if raw is None:
            continue
        text = ", ".join(raw) if setting.repeatable else raw
        origin = f"env {setting.env}" if setting.env in from_env else f"flag {setting.option}"
        given[setting.name] = Value(text, origin)
    return given


def load(argv=None, environ=None):
    """Parse flags, environment and config file into (Config, namespace); raise ConfigError."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    namespace = parser.parse_args(argv, env_vars=environ)
    sources = parser.get_source_to_settings_dict()
    overrides = _command_line_values(namespace, sources)
    sections = read_ini(namespace.config) if namespace.config else []
    return _assemble(namespace, overrides, sections), namespace


def _assemble(namespace, overrides, sections):
    """Combine defaults, file sections and overrides into a validated Config."""
    path = namespace.config
    defaults = {s.name: Value(s.default, "default") for s in SETTINGS if s.default is not None}
    route_sections = []
    seen_gconn = False
    for section in sections:
        if section.name == "gconn":
            if seen_gconn:
                raise ConfigError("section [gconn] given twice", source=f"{path}:{section.line}")
            seen_gconn = True
            for key, (text, line) in section.entries.items():
                setting = BY_NAME.get(key)
                if setting is None or setting.scope == ROUTE_ONLY:
                    allowed = ", ".join(s.name for s in SETTINGS if s.scope != ROUTE_ONLY)
                    raise ConfigError(f"unknown key; allowed in [gconn]: {allowed}",
                                      source=f"{path}:{line}", key=key, section="gconn")
                defaults[key] = Value(text, f"{path}:{line}")
        elif section.name.startswith("route:"):
            name = section.name[len("route:"):].strip()
            if not _ROUTE_NAME.match(name):
                raise ConfigError(f"bad route name {name!r}: use letters, digits, . _ -",
                                  source=f"{path}:{section.line}")
            if any(other.name == section.name for other in route_sections):
                raise ConfigError(f"route {name!r} defined twice",
                                  source=f"{path}:{section.line}")
            route_sections.append(section)
        else:
            raise ConfigError(f"unknown section [{section.name}]; allowed: [gconn], "
                              "[route:NAME]", source=f"{path}:{section.line}")

    process_values = {}
    for setting in PROCESS_SETTINGS:
        process_values[setting.name] = overrides.get(setting.name, defaults[setting.name])
    values = {"gconn": process_values}

    route_inputs = []
    for section in route_sections:
        given = {}
        for key, (text, line) in section.entries.items():
            setting = BY_NAME.get(key)
            if setting is None or setting.scope == PROCESS:
                allowed = ", ".join(s.name for s in ROUTE_SETTINGS)
                raise ConfigError(f"unknown key; allowed in a route: {allowed}",
                                  source=f"{path}:{line}", key=key, section=section.name)
            given[key] = Value(text, f"{path}:{line}")
        route_inputs.append((section.name, f"{path}:{section.line}", given))

    if "bind" in overrides or "destinations" in overrides:
        name = namespace.route_name or DEFAULT_ROUTE_NAME
        given = {key: overrides[key] for key in ("bind", "destinations") if key in overrides}
        origin = next(iter(given.values())).source
        if not _ROUTE_NAME.match(name):
            raise ConfigError(f"bad route name {name!r}: use letters, digits, . _ -",
                              source="flag --route-name", key="route-name")
        if any(section_name == f"route:{name}" for section_name, _, _ in route_inputs):
            raise ConfigError(f"route {name!r} from the command line is also in the file; "
                              "choose another --route-name", source=origin)
        route_inputs.append((f"route:{name}", origin, given))

    if not route_inputs:
        raise ConfigError("no route: give --bind and --destination, or a [route:NAME] section "
                          "in a config file (-c FILE)", source=path)

    routes = []
    for section_name, origin, given in route_inputs:
        route_values = {}
        for setting in ROUTE_SETTINGS:
            if setting.scope == ROUTE_ONLY:
                value = given.get(setting.name)
                if value is None:
                    raise ConfigError(f"route has no {setting.name}", source=origin,
                                      key=setting.name, section=section_name)
            else:
                value = overrides.get(setting.name) or given.get(setting.name) \
                    or defaults[setting.name]
            route_values[setting.name] = value
        values[section_name] = route_values
        parsed = {BY_NAME[key].attribute: _check(BY_NAME[key], value.text, value.source,
                                                   section_name)
                  for key, value in route_values.items()}
        if parsed["strategy"] != "round-robin-with-fallback" and any(
                spec.backup for spec in parsed["destinations"]):
            value = route_values["destinations"]
            raise ConfigError("'backup' destinations need strategy round-robin-with-fallback",
                              source=value.source, key="destinations", section=section_name)
        routes.append(RouteConfig(name=section_name[len("route:"):], **parsed))

    _check_distinct_binds(routes, values)
    process = ProcessConfig(**{
        BY_NAME[key].attribute: _check(BY_NAME[key], value.text, value.source, "gconn")
        for key, value in process_values.items()})
    _check_admin_exposure(process, process_values)
    return Config(path=path, process=process, routes=tuple(routes), values=values)


def _check_admin_exposure(process, values):
    """An admin endpoint beyond loopback needs a token file or an explicit admin-insecure."""
    address = process.admin
    if address is None or address.family == "unix" or process.admin_token_file \
            or process.admin_insecure:
        return
    try:
        loopback = ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        loopback = address.host == "localhost"
    if not loopback:
        raise ConfigError(f"admin on {address} is reachable beyond this host: set "
                          "admin-token-file, or admin-insecure = yes",
                          source=values["admin"].source, key="admin", section="gconn")


def _check_distinct_binds(routes, values):
    """Two routes may not listen on one address."""
    owners = {}
    for route in routes:
        if route.bind in owners and route.bind.port != 0:
            source = values[f"route:{route.name}"]["bind"].source
            raise ConfigError(f"address {route.bind} is already the bind of route "
                              f"{owners[route.bind]!r}", source=source, key="bind",
                              section=f"route:{route.name}")
        owners[route.bind] = route.name


__all__ = ["Config", "RouteConfig", "ProcessConfig", "Value", "load", "build_parser",
           "read_ini", "PROCESS", "ROUTE"]
