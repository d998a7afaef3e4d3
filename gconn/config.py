"""Load and validate gconn's configuration into immutable values, remembering where each came from.

Apart from reading the config file this is pure: no sockets.  Every bad setting is a ConfigError
naming the file, line, key, value and what is allowed, a malformed command line too; argparse
itself exits only for --help and --version.

How it works: ConfigArgParse reads the command line, the ``GCONN_*`` environment and the file and
applies flag > environment > file > default; ``-c/--config`` is its config-file argument and
every setting a flag with its own environment variable and default.  ``IniFile``, its
ConfigFileParser, hands it the ``[gconn]`` keys and keeps the ``[route:NAME]`` sections (with line
numbers) for ``load`` to merge per route: a flag or environment value, else the route's own key,
else ``[gconn]``'s or the default.  Each value's origin is the source ConfigArgParse recorded
(``get_source_to_settings_dict``) plus IniFile's line number.  ``--bind`` with ``--destination``
add one route, named by ``--route-name``.
"""

import dataclasses
import ipaddress
import os
import re

import configargparse

from . import __version__
from .errors import ConfigError
from .protocols import sni, tls
from .settings import BY_NAME, PROCESS_SETTINGS, ROUTE_ONLY, ROUTE_SETTINGS, SETTINGS

DEFAULT_ROUTE_NAME = "default"  # the route made of --bind and --destination
# what routes sharing a bind must agree on: what happens before a server name picks the route
BIND_SHARED = ("backlog", "accept-proxy", "accept-proxy-from", "proxy-header-timeout",
               "tls-handshake-timeout", "tcp-keepalive", "tcp-keepalive-idle",
               "tcp-keepalive-interval", "tcp-keepalive-count", "tcp-user-timeout")
GCONN_KEYS = tuple(s.name for s in SETTINGS if s.scope != ROUTE_ONLY)  # allowed in [gconn]
ROUTE_KEYS = tuple(s.name for s in ROUTE_SETTINGS)  # allowed in [route:NAME]
# ConfigArgParse's names for where a value came from (get_source_to_settings_dict's keys)
COMMAND_LINE = "command_line"
ENVIRONMENT = "environment_variables"
CONFIG_FILE = "config_file"  # followed by "|" and the file's path
DEFAULTS = "defaults"
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
class Section:
    """One ``[name]`` of the config file: its header's line and its keys with their lines."""

    name: str
    line: int
    entries: dict  # key -> (text, line)


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """The config file as ConfigArgParse's stream, read only when IniFile parses it.

    ConfigArgParse turns an error from its open function into a usage message; reading here
    instead keeps gconn's one-line ConfigError naming the file.
    """

    name: str  # the path; ConfigArgParse's streams are named by it

    def read(self):
        """The file's text; ConfigError if it cannot be read or is not UTF-8."""
        try:
            with open(self.name, encoding="utf-8") as stream:
                return stream.read()
        except OSError as error:
            raise ConfigError(f"cannot read config file: {error.strerror}",
                              source=self.name) from None
        except UnicodeDecodeError:
            raise ConfigError("config file is not UTF-8 text", source=self.name) from None


def read_sections(text, path):
    """Split INI text into Sections with line numbers; ConfigError on a line that is not INI."""
    sections = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _INLINE_COMMENT.sub("", raw).strip()
        if not line or line[0] in ";#":
            continue
        header = _SECTION.match(line)
        if header:
            sections.append(Section(_ROUTE_SECTION.sub("route:", header.group(1)), number, {}))
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


class IniFile(configargparse.ConfigFileParser):
    """gconn's INI format for ConfigArgParse: [gconn] keys go to it, [route:NAME] sections stay.

    ``parse`` returns the [gconn] keys under their flags, so ConfigArgParse merges them with the
    command line, environment and defaults; afterwards ``path``, ``lines`` ({flag: line}) and
    ``routes`` (Sections in file order) tell ``load`` where the file's values stand.  Every
    mistake is a ConfigError: ConfigArgParse's own exception would print a usage message.
    """

    def __init__(self):
        self.path = None  # the file parsed; None without one
        self.lines = {}  # flag of a [gconn] key -> its line
        self.routes = []  # the [route:NAME] Sections, in file order

    def get_syntax_description(self):
        """The config file's format, for --help."""
        return ("It is INI: [gconn] holds process settings and the defaults of every route, "
                "each [route:NAME] one route (its bind, destinations and route settings); "
                "write key = value with the flag's name (destinations for --destination); "
                "; or # starts a comment.")

    def parse(self, stream):
        """{flag: text} of [gconn]; keep the route sections; ConfigError on any mistake."""
        self.path = stream.name
        given = {}
        seen_gconn = False
        for section in read_sections(stream.read(), self.path):
            where = f"{self.path}:{section.line}"
            if section.name == "gconn":
                if seen_gconn:
                    raise ConfigError("section [gconn] given twice", source=where)
                seen_gconn = True
                for key, (text, line) in section.entries.items():
                    self._check_key(key, line, "gconn", GCONN_KEYS)
                    given[BY_NAME[key].option] = text
                    self.lines[BY_NAME[key].option] = line
            elif section.name.startswith("route:"):
                name = section.name[len("route:"):].strip()
                if not _ROUTE_NAME.match(name):
                    raise ConfigError(f"bad route name {name!r}: use letters, digits, . _ -",
                                      source=where)
                if any(other.name == section.name for other in self.routes):
                    raise ConfigError(f"route {name!r} defined twice", source=where)
                for key, (_, line) in section.entries.items():
                    self._check_key(key, line, section.name, ROUTE_KEYS)
                self.routes.append(section)
            else:
                raise ConfigError(f"unknown section [{section.name}]; allowed: [gconn], "
                                  "[route:NAME]", source=where)
        return given

    def _check_key(self, key, line, section, allowed):
        """ConfigError unless ``key`` is one of ``allowed`` in ``section``."""
        if key not in allowed:
            place = "[gconn]" if section == "gconn" else "a route"
            raise ConfigError(f"unknown key; allowed in {place}: {', '.join(allowed)}",
                              source=f"{self.path}:{line}", key=key, section=section)


class ArgParser(configargparse.ArgParser):
    """ConfigArgParse whose every complaint is a ConfigError, so it reaches the user as gconn's
    one line (exit 2) rather than a usage message, and a reload cannot exit the supervisor.

    argparse complains of a malformed command line; ConfigArgParse also of an environment
    value it read as a list (``GCONN_ADMIN_INSECURE=[yes]``).
    """

    def error(self, message):
        raise ConfigError(message.replace("\n", "\\n") + f" (see {self.prog} --help)")


def build_parser(ini_file, prog="gconn"):
    """The ConfigArgParse parser: each setting a flag with env variable and default; -c a file.

    ``ini_file`` (an IniFile) reads the file given by -c or GCONN_CONFIG.

    Abbreviated flags are refused: ConfigArgParse would not see ``--connect-t`` as the
    ``--connect-timeout`` that overrides the file, and the provenance would name the file.
    """
    parser = ArgParser(
        prog=prog, description="gconn: a TCP connection router on gevent greenlets.",
        formatter_class=configargparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
        config_file_parser_class=ini_file, config_file_open_func=ConfigFile)
    parser.add_argument("-c", "--config", is_config_file=True, env_var="GCONN_CONFIG",
                        metavar="FILE",
                        help="INI config file with [gconn] and [route:NAME] sections")
    parser.add_argument("--check-config", action="store_true",
                        help="validate, print the effective config with its origins, exit")
    parser.add_argument("--version", action="version", version=f"gconn {__version__}")
    parser.add_argument("--route-name", env_var="GCONN_ROUTE_NAME", default=None,
                        help=f"name of the route given by --bind (default {DEFAULT_ROUTE_NAME})")
    for setting in SETTINGS:
        switch = {"nargs": "?", "const": setting.bare} if setting.bare else {}
        parser.add_argument(
            setting.option, dest=setting.attribute, env_var=setting.env,
            default=setting.default, action="append" if setting.repeatable else "store",
            metavar=setting.allowed, help=setting.help, **switch)
    return parser


def _origins(parser, ini_file):
    """{setting name: (ConfigArgParse source, where)} for each setting it set, after parsing.

    ``where`` is what --check-config prints: ``flag --name``, ``env GCONN_NAME``,
    ``path:line`` or ``default``.  ConfigArgParse records the command line as a whole, so a
    setting is from there when its flag stands in it.
    """
    by_attribute = {setting.attribute: setting for setting in SETTINGS}
    found = {}
    for source, entries in parser.get_source_to_settings_dict().items():
        if source == COMMAND_LINE:
            _, arguments = entries[""]
            for setting in SETTINGS:
                if configargparse.already_on_command_line(arguments, [setting.option],
                                                          parser.prefix_chars):
                    found[setting.name] = (source, f"flag {setting.option}")
            continue
        for key, (action, _) in entries.items():
            setting = by_attribute.get(action.dest)
            if setting is None:  # -c or --route-name from the environment
                continue
            if source == ENVIRONMENT:
                found[setting.name] = (source, f"env {key}")
            elif source.startswith(CONFIG_FILE):
                found[setting.name] = (source, f"{ini_file.path}:{ini_file.lines[key]}")
            elif source == DEFAULTS:
                found[setting.name] = (source, "default")
    return found


def load(argv=None, environ=None):
    """Parse flags, environment and config file into (Config, namespace); raise ConfigError."""
    environ = os.environ if environ is None else environ
    ini_file = IniFile()
    parser = build_parser(ini_file)
    options = parser.parse_args(argv, env_vars=environ)
    merged, overrides = {}, set()  # ConfigArgParse's value of each setting; those flag or env set
    for name, (source, where) in _origins(parser, ini_file).items():
        merged[name] = Value(_given_text(options, BY_NAME[name]), where)
        if source in (COMMAND_LINE, ENVIRONMENT):
            overrides.add(name)

    routes, values = [], {"gconn": {s.name: merged[s.name] for s in PROCESS_SETTINGS}}
    named_by = ENVIRONMENT if "GCONN_ROUTE_NAME" in parser.get_source_to_settings_dict().get(
        ENVIRONMENT, {}) else COMMAND_LINE  # where --route-name came from, if given
    for section_name, origin, given in _route_inputs(ini_file, options, merged, named_by):
        route_values = {}
        for setting in ROUTE_SETTINGS:
            if setting.scope == ROUTE_ONLY:
                if setting.name in given:
                    route_values[setting.name] = given[setting.name]
                elif setting.default is None:
                    raise ConfigError(f"route has no {setting.name}", source=origin,
                                      key=setting.name, section=section_name)
                else:
                    route_values[setting.name] = Value(setting.default, "default")
            elif setting.name in given and setting.name not in overrides:
                route_values[setting.name] = given[setting.name]
            else:
                route_values[setting.name] = merged[setting.name]
        values[section_name] = route_values
        routes.append(_route_config(section_name, route_values))

    _check_distinct_binds(routes, values)
    for route in routes:
        _check_tls(route, values[f"route:{route.name}"])
    process = ProcessConfig(**{
        BY_NAME[key].attribute: _check(BY_NAME[key], value.text, value.source, "gconn")
        for key, value in values["gconn"].items()})
    _check_admin_exposure(process, values["gconn"])
    return Config(path=ini_file.path, process=process, routes=tuple(routes),
                  values=values), options


def _given_text(options, setting):
    """The text ConfigArgParse holds for ``setting``, a repeatable one's values joined by commas.

    Python 3.11's argparse stores a value of exactly ``--`` (``--workers=--``, or
    ``workers = --`` in [gconn], which ConfigArgParse passes on so) as ``[]``: it is ``--``
    again here, for the setting's parser to judge.  A repeatable setting whose environment
    variable ConfigArgParse read as an empty list (``GCONN_DESTINATION=[]``) has no values.
    """
    raw = getattr(options, setting.attribute)
    if setting.repeatable:
        return ", ".join("--" if item == [] else item for item in raw or ())
    return "--" if raw == [] else raw


def _route_inputs(ini_file, options, merged, named_by):
    """(section name, origin, {key: Value}) of each route: the file's, then the command line's
    (named by --route-name, from ConfigArgParse's source ``named_by``)."""
    inputs = []
    for section in ini_file.routes:
        given = {key: Value(text, f"{ini_file.path}:{line}")
                 for key, (text, line) in section.entries.items()}
        inputs.append((section.name, f"{ini_file.path}:{section.line}", given))
    if "bind" in merged or "destinations" in merged:
        name = options.route_name or DEFAULT_ROUTE_NAME
        given = {setting.name: merged[setting.name] for setting in ROUTE_SETTINGS
                 if setting.scope == ROUTE_ONLY and setting.name in merged}
        origin = next(iter(given.values())).source
        if not _ROUTE_NAME.match(name):
            source = "env GCONN_ROUTE_NAME" if named_by == ENVIRONMENT else "flag --route-name"
            raise ConfigError(f"bad route name {name!r}: use letters, digits, . _ -",
                              source=source, key="route-name")
        if any(section_name == f"route:{name}" for section_name, _, _ in inputs):
            raise ConfigError(f"route {name!r} from the command line is also in the file; "
                              "choose another --route-name", source=origin)
        inputs.append((f"route:{name}", origin, given))
    if not inputs:
        raise ConfigError("no route: give --bind and --destination, or a [route:NAME] section "
                          "in a config file (-c FILE)", source=ini_file.path)
    return inputs


def _route_config(section_name, route_values):
    """The RouteConfig of one route's effective Values; ConfigError naming a bad one."""
    parsed = {BY_NAME[key].attribute: _check(BY_NAME[key], value.text, value.source,
                                               section_name)
              for key, value in route_values.items()}
    if parsed["check"] == "send-expect" or any(
            spec.check == "send-expect" for spec in parsed["destinations"]):
        expect = route_values.get("check-expect")
        try:
            re.compile(parsed["check_expect"].encode("latin-1"))
            if not parsed["check_expect"]:
                raise re.error("empty")
        except (re.error, UnicodeError) as error:
            raise ConfigError(f"check = send-expect needs check-expect, a regular expression "
                              f"the answer must match ({error})",
                              source=expect.source if expect else "check = send-expect",
                              key="check-expect", section=section_name) from None
    if parsed["strategy"] != "round-robin-with-fallback" and any(
            spec.backup for spec in parsed["destinations"]):
        raise ConfigError("'backup' destinations need strategy round-robin-with-fallback",
                          source=route_values["destinations"].source, key="destinations",
                          section=section_name)
    return RouteConfig(name=section_name[len("route:"):], **parsed)


def _check(setting, text, source, section):
    """Parse ``text`` for ``setting`` or raise a ConfigError naming all that went in."""
    try:
        return setting.parse(text)
    except ValueError as error:
        raise ConfigError(f"bad value {text!r}: {error}", source=source, key=setting.name,
                          section=section) from None


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


def _check_tls(route, given):
    """A terminating route's certificates, keys and CA load and match, and so do the files a
    route connecting to TLS destinations names (exit 2 otherwise)."""
    _check_destination_tls(route, given)
    if not route.tls_cert:
        if route.tls_key:
            raise ConfigError("tls-key without tls-cert", source=given["tls-key"].source,
                              key="tls-key", section=f"route:{route.name}")
        return
    where = dict(source=given["tls-cert"].source, key="tls-cert", section=f"route:{route.name}")
    if route.tls_key and len(route.tls_key) != len(route.tls_cert):
        raise ConfigError(f"{len(route.tls_cert)} tls-cert files but {len(route.tls_key)} "
                          f"tls-key files: give one key per certificate, or none", **where)
    if route.server_names:
        raise ConfigError("a route that terminates TLS cannot also be picked by server-names "
                          "(the certificate pairs are picked by server name instead)", **where)
    try:
        tls.server_context(route.tls_cert, route.tls_key, route.tls_client_ca,
                           route.tls_min_version, route.tls_ciphers)
    except (ValueError, OSError) as error:
        raise ConfigError(_file_problem(error, given["tls-cert"].text), **where) from None


def _check_destination_tls(route, given):
    section = f"route:{route.name}"
    tls_destinations = [spec for spec in route.destinations
                        if spec.uses_tls(route.destination_tls)]
    if not tls_destinations:
        return
    if route.server_names:
        raise ConfigError("a route picked by server-names forwards the client's TLS untouched: "
                          "it cannot also connect to its destinations over TLS",
                          source=given["destination-tls"].source, key="destination-tls",
                          section=section)
    if not route.destination_tls_server_name and any(
            spec.address.family == "unix" for spec in tls_destinations):
        raise ConfigError("TLS to a unix: destination needs destination-tls-server-name (the "
                          "name to verify)", source=given["destinations"].source,
                          key="destination-tls-server-name", section=section)
    key = "destination-tls-ca"
    try:
        context = tls.client_context(route.destination_tls_ca, "", "")
        if route.destination_tls_cert:
            key = "destination-tls-cert"
            tls.load_pair(context, route.destination_tls_cert, route.destination_tls_key)
    except (ValueError, OSError) as error:
        raise ConfigError(_file_problem(error, given[key].text), source=given[key].source,
                          key=key, section=section) from None


def _file_problem(error, files):
    """What went wrong loading TLS ``files``: tls.py's ValueError says it; an OSError it lets
    through (a directory, a name too long) names no file, so ``files`` is named with it."""
    if isinstance(error, OSError):
        return f"{files!r}: {error.strerror or error}"
    return str(error)


def _check_distinct_binds(routes, values):
    """Two routes may share one address only as TLS routes told apart by ``server-names``
    (at most one without names: the default), with no name claimed twice and the same
    settings for what happens before the name is known."""
    owners = {}
    for route in routes:
        if not route.bind.fixed:
            continue
        section = f"route:{route.name}"
        given = values[section]
        for other in owners.get(route.bind, ()):
            if route.tls_cert or other.tls_cert:
                raise ConfigError(f"address {route.bind} is already the bind of route "
                                  f"{other.name!r}; a route that terminates TLS (tls-cert) "
                                  f"shares its bind with no other", source=given["bind"].source,
                                  key="bind", section=section)
            if not route.server_names and not other.server_names:
                raise ConfigError(f"address {route.bind} is already the bind of route "
                                  f"{other.name!r} (routes share a bind only when all but "
                                  f"one name server-names)", source=given["bind"].source,
                                  key="bind", section=section)
            shared = sni.overlap(route.server_names, other.server_names)
            if shared:
                raise ConfigError(f"server name {shared} is already route {other.name!r}'s "
                                  f"on {route.bind}", source=given["server-names"].source,
                                  key="server-names", section=section)
            for key in BIND_SHARED:
                attribute = BY_NAME[key].attribute
                if getattr(route, attribute) != getattr(other, attribute):
                    value = given.get(key)
                    raise ConfigError(
                        f"routes sharing {route.bind} must agree on {key}: "
                        f"{getattr(route, attribute)!r} here, {getattr(other, attribute)!r} "
                        f"in route {other.name!r}",
                        source=value.source if value else given["bind"].source, key=key,
                        section=section)
        owners.setdefault(route.bind, []).append(route)


__all__ = ["Config", "RouteConfig", "ProcessConfig", "Value", "IniFile", "load",
           "build_parser"]
