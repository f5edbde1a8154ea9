"""Rendering the chart with the real Helm engine, and reading what it rendered.

Everything here is plain data handling: the Helm engine is helm-python-sdk (Helm's Go SDK over a
C ABI), the Kubernetes schemas come from kubernetes-validate, and the NetworkPolicy evaluation is
the documented semantics of networking.k8s.io/v1, written out so tests can ask "may this pod
reach that one".
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import yaml
from jsonschema import Draft202012Validator
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kura"
RELEASE = "kura"
RELEASE_NAMESPACE = "kura-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas
# kubernetes-validate ships: an object valid against both is valid in between.
KUBE_MIN = "1.30.0"
KUBE_MAX = kv_utils.latest_version()

# Credentials every render that has tenants needs (the chart refuses tenants without them).
STORAGE_CREDENTIALS = {"credentials": {"accessKeyId": "test-access", "secretAccessKey": "test-secret"}}

POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


def merge(base: dict, override: dict) -> dict:
    """Deep-merge override into a copy of base (maps merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Rendered:
    values: dict
    objects: list[dict]
    notes: str

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        found = [
            o
            for o in self.objects
            if o["kind"] == kind
            and o["metadata"]["name"] == name
            and (namespace is None or o["metadata"].get("namespace") == namespace)
        ]
        assert len(found) == 1, f"expected one {kind} {name} in {namespace}, found {len(found)}"
        return found[0]

    def find(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self.get(kind, name, namespace)
        except AssertionError:
            return None

    def in_namespace(self, namespace: str) -> list[dict]:
        return [o for o in self.objects if o["metadata"].get("namespace") == namespace]


# libyaml's parser: the 200-tenant render is ~300,000 lines, which the pure-Python one needs
# half a minute for.
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_chart: helm.Chart | None = None


def chart() -> helm.Chart:
    global _chart
    if _chart is None:
        _chart = helm.Chart.load(str(CHART))
    return _chart


def render(values: dict | None = None, *, is_upgrade: bool = False) -> Rendered:
    """Render like `helm install kura charts/kura -n kura-system -f values` would."""
    manifests = chart().render(
        values or {},
        name=RELEASE,
        namespace=RELEASE_NAMESPACE,
        is_install=not is_upgrade,
        is_upgrade=is_upgrade,
    )
    objects: list[dict] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.load_all(text, Loader=_YamlLoader):
            if doc:
                objects.append(doc)
    return Rendered(values=values or {}, objects=objects, notes=notes)


def lint(values: dict | None = None) -> dict:
    return helm.lint(str(CHART), values, strict=True, kube_version="v" + KUBE_MIN)


class KubeValidator:
    """kubernetes-validate's strict schemas, with one compiled validator per kind.

    kubernetes_validate.validate() reloads the multi-megabyte definitions file for every object;
    for the 200-tenant render that is minutes. This does the same validation (same schema files,
    same registry construction, Draft 2020-12) once per kind.
    """

    def __init__(self, version: str):
        self.version = version
        self.schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
        self._definitions = kv_utils.schema_contents(f"{self.schema_dir}/_definitions.json", version)
        self._validators: dict[tuple[str, str], Draft202012Validator] = {}

    def _validator(self, obj: dict) -> Draft202012Validator:
        api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
        key = (obj["kind"].lower(), api)
        if key not in self._validators:
            schema = kv_utils.schema_contents(f"{self.schema_dir}/{key[0]}-{key[1]}.json", self.version)
            registry = Resource.from_contents(self._definitions) @ (Resource.from_contents(schema) @ Registry())
            self._validators[key] = Draft202012Validator(schema, registry=registry)
        return self._validators[key]

    def errors(self, obj: dict) -> list[str]:
        where = f"{obj['kind']}/{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
        return [
            f"{where}: {'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in self._validator(obj).iter_errors(obj)
        ]


# --- pods -------------------------------------------------------------------------------------


@dataclass
class PodTemplate:
    owner: dict
    metadata: dict
    spec: dict

    @property
    def where(self) -> str:
        m = self.owner["metadata"]
        return f"{self.owner['kind']}/{m.get('namespace', '')}/{m['name']}"

    @property
    def namespace(self) -> str:
        return self.owner["metadata"].get("namespace", "")

    @property
    def labels(self) -> dict:
        return self.metadata.get("labels", {})

    def containers(self) -> list[dict]:
        return list(self.spec.get("initContainers", [])) + list(self.spec.get("containers", []))


def pod_templates(objects: list[dict]) -> Iterator[PodTemplate]:
    for obj in objects:
        kind = obj["kind"]
        if kind == "Pod":
            yield PodTemplate(obj, obj["metadata"], obj["spec"])
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            t = obj["spec"]["template"]
            yield PodTemplate(obj, t.get("metadata", {}), t["spec"])
        elif kind == "CronJob":
            t = obj["spec"]["jobTemplate"]["spec"]["template"]
            yield PodTemplate(obj, t.get("metadata", {}), t["spec"])


def container(template: PodTemplate, name: str) -> dict:
    found = [c for c in template.containers() if c["name"] == name]
    assert len(found) == 1, f"{template.where} has no single container {name}"
    return found[0]


# --- label selectors and NetworkPolicies ------------------------------------------------------


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """metav1.LabelSelector semantics: {} matches everything; a missing selector matches nothing."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace + labels + namespace labels), or an IP address outside the cluster."""

    namespace: str = ""
    labels: tuple = ()
    namespace_labels: tuple = ()
    ip: str = ""

    @staticmethod
    def pod(namespace: str, labels: dict, namespace_labels: dict) -> "Endpoint":
        return Endpoint(namespace, tuple(sorted(labels.items())), tuple(sorted(namespace_labels.items())))

    @staticmethod
    def address(ip: str) -> "Endpoint":
        return Endpoint(ip=ip)


def _peer_matches(peer: dict, policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if not other.ip:
            return False
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        if address not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(address in ipaddress.ip_network(e) for e in block.get("except", []))
    if other.ip:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], dict(other.namespace_labels)):
            return False
    elif other.namespace != policy_namespace:
        return False
    if "podSelector" in peer:
        return selector_matches(peer["podSelector"], dict(other.labels))
    return True


def _ports_match(ports: list | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        end = p.get("endPort", p["port"])
        if isinstance(p["port"], int) and p["port"] <= port <= end:
            return True
    return False


def _direction_allows(policies: list[dict], subject: Endpoint, direction: str, other: Endpoint, port: int, protocol: str) -> bool:
    """Whether policies in the subject's namespace let traffic in `direction` between subject and other."""
    kind = "Ingress" if direction == "ingress" else "Egress"
    peers_key = "from" if direction == "ingress" else "to"
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace") == subject.namespace
        and selector_matches(p["spec"]["podSelector"], dict(subject.labels))
        and kind in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True  # not isolated in this direction
    for policy in selecting:
        for rule in policy["spec"].get(direction) or []:
            peers = rule.get(peers_key)
            if peers is None or peers == []:
                peer_ok = True
            else:
                peer_ok = any(_peer_matches(peer, subject.namespace, other) for peer in peers)
            if peer_ok and _ports_match(rule.get("ports"), port, protocol):
                return True
    return False


def connection_allowed(policies: list[dict], source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Both the source's egress and (for a pod) the destination's ingress must allow it."""
    if not source.ip and not _direction_allows(policies, source, "egress", destination, port, protocol):
        return False
    if not destination.ip and not _direction_allows(policies, destination, "ingress", source, port, protocol):
        return False
    return True


# --- containers as a kubelet would start them -------------------------------------------------

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined references are replaced, $$ escapes, others stay."""

    def replace(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(replace, text)


def _secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def resolve_env(c: dict, rendered: Rendered, namespace: str) -> dict[str, str]:
    """The environment a container gets, with Secrets and ConfigMaps taken from the render."""

    def source(kind: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = rendered.find(kind, name, namespace)
        if obj is None:
            assert optional, f"{kind} {namespace}/{name} is referenced but not rendered"
            return None
        return _secret_data(obj) if kind == "Secret" else dict(obj.get("data") or {})

    env: dict[str, str] = {}
    for entry in c.get("envFrom") or []:
        prefix = entry.get("prefix", "")
        if "configMapRef" in entry:
            ref, kind = entry["configMapRef"], "ConfigMap"
        else:
            ref, kind = entry["secretRef"], "Secret"
        data = source(kind, ref["name"], ref.get("optional", False)) or {}
        env.update({prefix + k: v for k, v in data.items()})
    for entry in c.get("env") or []:
        name = entry["name"]
        if "value" in entry:
            env[name] = expand(str(entry["value"]), env)
            continue
        value_from = entry["valueFrom"]
        if "secretKeyRef" in value_from:
            ref, kind = value_from["secretKeyRef"], "Secret"
        elif "configMapKeyRef" in value_from:
            ref, kind = value_from["configMapKeyRef"], "ConfigMap"
        else:
            raise AssertionError(f"{name}: only Secret and ConfigMap references can be resolved offline")
        data = source(kind, ref["name"], ref.get("optional", False))
        if data is None or ref["key"] not in data:
            assert ref.get("optional", False), f"{name}: key {ref['key']} missing in {kind} {ref['name']}"
            continue
        env[name] = data[ref["key"]]
    return env


def argv(c: dict, env: dict[str, str]) -> list[str]:
    """command + args after $(VAR) expansion; the image entrypoint is not used by the chart."""
    assert c.get("command"), f"container {c['name']} relies on the image entrypoint"
    return [expand(str(a), env) for a in list(c["command"]) + list(c.get("args") or [])]
