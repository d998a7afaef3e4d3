"""The Kubernetes manifests of conf/kubernetes/, offline: each one valid against the Kubernetes
schemas, and each number or name they share with gconn (probe paths and ports, route ports,
grace period, workers, config keys, labels) checked against gconn itself rather than trusted.

The ConfigMap's gconn.conf is run through ``gconn --check-config`` with the container's own
command, arguments and environment, its mounts laid out in a temporary directory; the checks
below read that effective config, never a copy of its values.
"""

import configparser
import ipaddress
import math
import os
import pathlib
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from gconn import supervisor
from gconn.admin import PROBES, Admin
from gconn.settings import BY_NAME, SETTINGS, parse_admin_address, parse_bind, parse_discovered

# the Kubernetes release whose schemas (bundled by kubernetes-validate) the manifests must
# match; they use only GA APIs (apps/v1, policy/v1, v1)
KUBERNETES_VERSION = "1.33"
ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "conf" / "kubernetes"
FILES = ("configmap.yaml", "deployment.yaml", "service.yaml", "pdb.yaml",
         "headless-destinations.yaml")
SECRET_TEXT = "a-test-token"  # what each mounted Secret key holds in the laid-out mounts
CLUSTER_DOMAIN = "svc.cluster.local"  # Kubernetes' default cluster domain


def documents(name):
    """The non-empty YAML documents of conf/kubernetes/NAME."""
    with open(MANIFESTS / name, encoding="utf-8") as stream:
        return [document for document in yaml.safe_load_all(stream) if document]


def one(kind, name=None):
    """The only manifest of ``kind`` (named ``name``, if given) over all FILES."""
    found = [document for file in FILES for document in documents(file)
             if document["kind"] == kind
             and (name is None or document["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container():
    """The Deployment's gconn container."""
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container: gconn"
    return containers[0]


def quantity(text):
    """A Kubernetes CPU quantity (``2``, ``1500m``, ``0.5``) in CPUs."""
    text = str(text)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def environment(spec):
    """The container's environment as the kubelet would set it (the kinds used here)."""
    env = {}
    for variable in spec.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        field = variable["valueFrom"]["resourceFieldRef"]  # no other kind is resolved here
        assert field.get("containerName", spec["name"]) == spec["name"]
        resource = field["resource"]
        assert resource in ("limits.cpu", "requests.cpu"), resource
        kind, _, what = resource.partition(".")
        amount = quantity(spec["resources"][kind][what]) / quantity(field.get("divisor", "1"))
        env[variable["name"]] = str(math.ceil(amount))  # the Downward API rounds CPUs up
    return env


def lay_out_mounts(spec, volumes, root):
    """Write the container's ConfigMap and Secret mounts under ``root``; return a function
    that moves a path in the pod to its place under ``root``."""
    configmaps = {document["metadata"]["name"]: document for document in documents(
        "configmap.yaml")}
    mounts = {mount["mountPath"]: mount for mount in spec["volumeMounts"]}

    # a mount path where a path starts, in one pass (so a moved path is not moved again)
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(
        re.escape(path) for path in sorted(mounts, key=len, reverse=True)) + r")(?=/|\s|$)")

    def moved(text):
        return pattern.sub(lambda match: str(root) + match.group(1), text)

    for path, mount in mounts.items():
        volume = volumes[mount["name"]]
        folder = root / path.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            for key, text in configmaps[volume["configMap"]["name"]]["data"].items():
                (folder / key).write_text(moved(text))
        elif "secret" in volume:
            for item in volume["secret"]["items"]:
                (folder / item["path"]).write_text(SECRET_TEXT + "\n")
        else:
            assert "emptyDir" in volume, volume
    return moved


@pytest.fixture(scope="module")
def effective(tmp_path_factory):
    """The effective config of the Deployment's gconn, from ``gconn --check-config`` run with
    the container's command, args and environment on the ConfigMap: {section: {key: text}},
    paths as the pod sees them."""
    spec = container()
    volumes = {volume["name"]: volume
               for volume in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    root = tmp_path_factory.mktemp("pod")
    moved = lay_out_mounts(spec, volumes, root)
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in setup["options.entry_points"][
        "console_scripts"].strip().splitlines())
    assert spec["command"] == ["gconn"] and scripts["gconn"] == "gconn.cli:main"
    env = environment(spec)
    result = subprocess.run(
        [sys.executable, "-m", "gconn", *(moved(arg) for arg in spec["args"]),
         "--check-config"], capture_output=True, text=True, timeout=60,
        env={**{key: value for key, value in os.environ.items()
                if not key.startswith("GCONN_")}, **env})
    assert result.returncode == 0, result.stderr
    sections, section = {}, None
    for line in result.stdout.splitlines():
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
        elif " = " in line:
            assignment, _, source = line.rpartition("    ; ")
            key, _, value = assignment.partition(" = ")
            section[key.strip()] = value.strip().replace(str(root), "")  # the pod's paths
    assert sections["gconn"], result.stdout
    return sections


def routes(effective):
    """{route name: its effective settings} from the check-config output."""
    return {name.partition(":")[2]: values for name, values in effective.items()
            if name.startswith("route:")}


def resolve_port(spec, port):
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    named = [entry["containerPort"] for entry in spec["ports"] if entry.get("name") == port]
    assert named, f"no container port named {port!r}"
    return named[0]


@pytest.mark.parametrize("name", FILES)
def test_manifest_is_valid_kubernetes(name):
    """Every document of the file validates (strictly: no unknown field) against the stated
    Kubernetes version's schemas, bundled by kubernetes-validate (no network)."""
    found = documents(name)
    assert found
    for document in found:
        version = kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        assert version == KUBERNETES_VERSION


def test_every_manifest_is_tested():
    """No file in conf/kubernetes/ escapes these tests."""
    assert sorted(path.name for path in MANIFESTS.iterdir()) == sorted(FILES)


def test_environment_names_are_gconn_settings():
    """Each GCONN_* variable the container sets is a setting's (ConfigArgParse would
    silently ignore a misspelt one)."""
    known = {setting.env for setting in SETTINGS}
    names = [variable["name"] for variable in container().get("env", [])]
    assert names and all(name in known for name in names), names


def test_probes_reach_the_admin_probe_routes_without_the_token(effective):
    """The liveness and readiness probes ask /livez and /readyz on the admin port, the admin
    listens beyond loopback (the kubelet probes the pod's address) with a token, and those
    two paths answer without it."""
    spec = container()
    process = effective["gconn"]
    admin = parse_admin_address(process["admin"])
    assert not ipaddress.ip_address(admin.host).is_loopback
    assert process["admin-token-file"], "the admin beyond loopback is protected by a token"
    probes = {kind: spec[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/livez"
    assert probes["readinessProbe"]["path"] == "/readyz"
    served = Admin(parse_admin_address("127.0.0.1:0"), SECRET_TEXT, NotReadyFleet(), None,
                   lambda: None)
    try:
        for probe in probes.values():
            assert "httpHeaders" not in probe, "no token in the probe (it would be in clear)"
            assert probe.get("scheme", "HTTP") == "HTTP"
            assert resolve_port(spec, probe["port"]) == admin.port
            assert probe["path"] in served.routes and probe["path"] in PROBES
            status, body = wsgi_get(served, probe["path"])
            assert (status, body) in (("200 OK", b"ok\n"),
                                      ("503 Service Unavailable", b"not ready\n")), status
    finally:
        served.socket.close()


class NotReadyFleet:
    """A fleet whose readiness has a reason (the probe must see 503 without it)."""

    def readiness_problems(self):
        return ["stopping"]


def wsgi_get(admin, path):
    """(status line, body) of a GET of ``path`` without a token, straight through the WSGI
    application."""
    answer = {}
    body = admin.application({"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": ""},
                             lambda status, headers: answer.setdefault("status", status))
    return answer["status"], b"".join(body)


def test_admin_token_file_is_a_mounted_secret(effective):
    """admin-token-file is a key of a Secret volume mounted in the container."""
    spec = container()
    volumes = {volume["name"]: volume
               for volume in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    path = pathlib.PurePosixPath(effective["gconn"]["admin-token-file"])
    for mount in spec["volumeMounts"]:
        if path.parent == pathlib.PurePosixPath(mount["mountPath"]):
            secret = volumes[mount["name"]]["secret"]
            assert path.name in [item["path"] for item in secret["items"]]
            return
    pytest.fail(f"{path} is on no mounted volume")


def test_container_ports_are_the_route_and_admin_ports(effective):
    """The container ports are exactly the routes' bind ports and the admin port; routes bind
    every address of the pod."""
    spec = container()
    binds = [parse_bind(route["bind"]) for route in routes(effective).values()]
    assert binds and all(bind.family == "tcp" and ipaddress.ip_address(bind.host).is_unspecified
                         for bind in binds)
    admin = parse_admin_address(effective["gconn"]["admin"])
    assert sorted(entry["containerPort"] for entry in spec["ports"]) == \
        sorted([bind.port for bind in binds] + [admin.port])


def test_service_reaches_the_routes_on_the_gconn_pods(effective):
    """The Service selects the Deployment's pods and each target port is a route's port."""
    service = one("Service", "gconn")
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    bound = {parse_bind(route["bind"]).port for route in routes(effective).values()}
    for port in service["spec"]["ports"]:
        assert resolve_port(container(), port["targetPort"]) in bound, port


def test_termination_grace_outlasts_gconns_whole_shutdown(effective):
    """terminationGracePeriodSeconds exceeds preStop + shutdown-delay + shutdown-timeout +
    the supervisor's kill grace, so the kubelet's SIGKILL never cuts a drain gconn would
    finish; and the delay is set, since nothing else holds the endpoints' propagation."""
    pod = one("Deployment")["spec"]["template"]["spec"]
    process = effective["gconn"]
    delay = BY_NAME["shutdown-delay"].parse(process["shutdown-delay"])
    timeout = BY_NAME["shutdown-timeout"].parse(process["shutdown-timeout"])
    pre_stop = container().get("lifecycle", {}).get("preStop", {})
    pre_stop_seconds = pre_stop.get("sleep", {}).get("seconds", 0)
    assert not set(pre_stop) - {"sleep"}, "a preStop this test cannot time"
    assert delay > 0
    assert pod["terminationGracePeriodSeconds"] > \
        pre_stop_seconds + delay + timeout + supervisor.KILL_GRACE


def test_workers_match_the_cpu_limit(effective):
    """gconn runs one worker per CPU of the container's limit (not the node's cores), and
    requests what it is limited to."""
    spec = container()
    resources = spec["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS"
    workers = BY_NAME["workers"].parse(effective["gconn"]["workers"])
    assert workers == math.ceil(quantity(resources["limits"]["cpu"]))
    assert "memory" in resources["limits"]


def test_disruption_budget_covers_the_deployment():
    """The PodDisruptionBudget selects exactly the Deployment's pods and leaves some up."""
    budget = one("PodDisruptionBudget")["spec"]
    deployment = one("Deployment")["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    assert budget["selector"] == deployment["selector"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < budget["maxUnavailable"] < deployment["replicas"]


def test_dns_destinations_name_the_headless_service(effective):
    """Each dns: destination is a headless Service of the manifests, on one of its ports."""
    found = 0
    for route in routes(effective).values():
        for entry in route["destinations"].split(","):
            address, discover = parse_discovered(entry.split()[0])
            if discover != "dns":
                continue
            name, namespace, domain = address.host.split(".", 2)
            service = one("Service", name)
            assert domain == CLUSTER_DOMAIN
            assert namespace == service["metadata"].get("namespace", "default")
            assert service["spec"]["clusterIP"] == "None"
            assert address.port in [port["port"] for port in service["spec"]["ports"]]
            found += 1
    assert found, "no dns: destination"
