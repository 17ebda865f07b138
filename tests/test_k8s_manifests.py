"""Structural checks of the Kubernetes manifests in deploy/k8s.

No cluster is involved: every YAML document is parsed and cross-checked
(images and versions, ports, arguments, volumes and the Secrets each pod
may see), so an edit that breaks the wiring fails here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

K8S_DIR = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
FLOWER_VERSION = "1.42.0"
NUM_SITES = 3


def _documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents += [document for document in yaml.safe_load_all(path.read_text()) if document]
    return documents


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {document["metadata"]["name"]: document for document in _documents() if document["kind"] == kind}


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def _containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = _pod(deployment)
    return {container["name"]: container for container in [*pod.get("initContainers", []), *pod["containers"]]}


def _args(container: dict[str, Any]) -> dict[str, str]:
    """Return ``--flag=value`` arguments as a dict (flags without a value map to '')."""
    parsed = {}
    for argument in container.get("args", []):
        if argument.startswith("--"):
            flag, _, value = argument.partition("=")
            parsed[flag] = value
    return parsed


def _mounted_file(container: dict[str, Any], pod: dict[str, Any], path: str) -> bool:
    """Return whether ``path`` lies in one of the container's mounts, and as a listed Secret item if the mount lists items."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        items = volumes[mount["name"]].get("secret", {}).get("items")
        return items is None or path[len(prefix) :] in {item["path"] for item in items}
    return False


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}

    assert listed == present
    assert kustomization["namespace"] == "fedseal"


def test_expected_kinds() -> None:
    deployments = _by_kind("Deployment")

    assert sorted(deployments) == ["site-0", "site-1", "site-2", "superlink"]
    assert sorted(_by_kind("Service")) == ["superlink"]
    assert sorted(_by_kind("ConfigMap")) == [f"site-{i}-node-config" for i in range(NUM_SITES)]
    assert sorted(_by_kind("Namespace")) == ["fedseal"]


def test_flower_images_pinned() -> None:
    images = [container["image"] for deployment in _by_kind("Deployment").values() for container in _containers(deployment).values()]

    flower = [image for image in images if image.startswith("flwr/")]
    assert sorted(set(flower)) == [f"flwr/superlink:{FLOWER_VERSION}", f"flwr/supernode:{FLOWER_VERSION}"]
    for name in ("serverapp", "clientapp"):
        dockerfile = (K8S_DIR / "images" / f"{name}.Dockerfile").read_text()
        assert re.search(rf"^FROM flwr/{name}:{re.escape(FLOWER_VERSION)}$", dockerfile, re.MULTILINE)
        assert "torch==2.13.0" in dockerfile


def test_superlink_tls_auth_and_port() -> None:
    deployment = _by_kind("Deployment")["superlink"]
    pod = _pod(deployment)
    superlink = _containers(deployment)["superlink"]
    args = _args(superlink)

    assert "--enable-supernode-auth" in args
    assert "--insecure" not in args
    assert args["--isolation"] == "process"
    assert "--disable-runtime-dependency-installation" in args
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--database"):
        assert _mounted_file(superlink, pod, args[flag]), flag

    service = _by_kind("Service")["superlink"]
    ports = {port["name"]: port["containerPort"] for port in superlink["ports"]}
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert service["spec"]["ports"][0]["port"] == ports["superlink"] == int(args["--port"])


def test_serverapp_reaches_superlink_over_tls() -> None:
    deployment = _by_kind("Deployment")["superlink"]
    serverapp = _containers(deployment)["serverapp"]
    args = _args(serverapp)
    port = _args(_containers(deployment)["superlink"])["--port"]

    assert serverapp["command"] == ["flower-superexec"]
    assert args["--runtime-api-address"] == f"127.0.0.1:{port}"
    assert "--insecure" not in args
    assert _mounted_file(serverapp, _pod(deployment), args["--root-certificates"])


def test_server_pod_holds_no_site_secret() -> None:
    pod = _pod(_by_kind("Deployment")["superlink"])
    secrets = {volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}

    assert secrets == {"fedseal-superlink-tls", "fedseal-server-keys"}
    text = (K8S_DIR / "superlink.yaml").read_text()
    assert "ckks_secret_context" not in text
    assert "auth.key" not in text
    assert "signing.key" not in text


@pytest.mark.parametrize("site", range(NUM_SITES))
def test_supernode_wiring(site: int) -> None:
    deployment = _by_kind("Deployment")[f"site-{site}"]
    pod = _pod(deployment)
    containers = _containers(deployment)
    supernode_args = _args(containers["supernode"])
    clientapp_args = _args(containers["clientapp"])
    service = _by_kind("Service")["superlink"]

    assert supernode_args["--superlink"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert supernode_args["--isolation"] == "process"
    assert "--insecure" not in supernode_args
    for flag in ("--root-certificates", "--auth-supernode-private-key", "--node-config"):
        assert _mounted_file(containers["supernode"], pod, supernode_args[flag]), flag
    assert clientapp_args["--runtime-api-address"] == f"127.0.0.1:{supernode_args['--port']}"

    # Only this site's Secret, and every mount refers to a volume of the pod.
    secrets = {volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}
    assert secrets == {f"fedseal-site-{site}"}
    volume_names = {volume["name"] for volume in pod["volumes"]}
    for container in containers.values():
        assert {mount["name"] for mount in container.get("volumeMounts", [])} <= volume_names

    claims = {volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"] if "persistentVolumeClaim" in volume}
    assert f"site-{site}-state" in _by_kind("PersistentVolumeClaim")
    assert claims == {f"site-{site}-state", f"site-{site}-data"}


@pytest.mark.parametrize("site", range(NUM_SITES))
def test_node_config_paths_mounted(site: int) -> None:
    deployment = _by_kind("Deployment")[f"site-{site}"]
    clientapp = _containers(deployment)["clientapp"]
    config = tomllib.loads(_by_kind("ConfigMap")[f"site-{site}-node-config"]["data"]["node-config.toml"])

    assert config["partition-id"] == site
    assert config["num-partitions"] == NUM_SITES
    assert _mounted_file(clientapp, _pod(deployment), config["signing-key"])
    assert _mounted_file(clientapp, _pod(deployment), config["ckks-secret-dir"] + "/ckks_secret_context.bin")
    for key in ("state-dir", "data-root"):
        mounts = {mount["mountPath"] for mount in clientapp["volumeMounts"]}
        assert config[key] in mounts, key


def test_superlink_volumes_exist() -> None:
    pod = _pod(_by_kind("Deployment")["superlink"])
    claims = {volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"] if "persistentVolumeClaim" in volume}

    assert claims <= set(_by_kind("PersistentVolumeClaim"))
    volume_names = {volume["name"] for volume in pod["volumes"]}
    for container in _containers(_by_kind("Deployment")["superlink"]).values():
        assert {mount["name"] for mount in container.get("volumeMounts", [])} <= volume_names
