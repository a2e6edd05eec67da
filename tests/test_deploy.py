"""deploy/: the Kubernetes manifests are valid against the Kubernetes schemas and as safe as the
compose file, and the Slurm batch script asks for what it needs and starts exactly one
`nkat-search worker` per array task, on a stub `srun` and, where Slurm is installed, on a real
one-node Slurm cluster."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, unavailable

pytestmark = pytest.mark.infra

K8S = ROOT / "deploy" / "kubernetes"
# the search (`kubectl apply -k deploy/kubernetes`) and its official result, applied on its own once
# the search is done (`kubectl apply -k deploy/kubernetes/report`)
REPORT = K8S / "report"
KUSTOMIZATIONS = (K8S, REPORT)
K8S_README = K8S / "README.md"
SBATCH = ROOT / "deploy" / "slurm" / "nkat-search-workers.sbatch"
COMPOSE = ROOT / "docker-compose.yml"
# the oldest Kubernetes the manifests claim (deploy/kubernetes/README.md) and the newest schemas shipped
K8S_OLDEST = "1.29"
STORAGE_SECRET = ("nkat-search-storage", "url")
IMAGE = "nkat-search:latest"


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ---------------------------------------------------------------------------------------------
# Kubernetes


def kustomization(folder: Path = K8S) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def manifests(folders: tuple[Path, ...] = KUSTOMIZATIONS) -> list[tuple[str, dict]]:
    """(file, resource) for every document of every file the kustomizations in folders list."""
    return [
        (str((folder / name).relative_to(K8S)), doc)
        for folder in folders
        for name in kustomization(folder)["resources"]
        for doc in yaml.safe_load_all((folder / name).read_text())
        if doc
    ]


def resource(kind: str, name: str) -> dict:
    found = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in ("Job", "Deployment", "StatefulSet") else None


def pod_specs() -> dict[str, dict]:
    return {doc["metadata"]["name"]: spec for _, doc in manifests() if (spec := pod_spec(doc)) is not None}


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(spec: dict, name: str) -> dict:
    return next(c for c in containers(spec) if c["name"] == name)


def env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def mount(spec: dict, c: dict, claim: str) -> dict:
    """Where container c of pod spec mounts the PersistentVolumeClaim named claim."""
    volume = next(v["name"] for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim)
    return next(m for m in c["volumeMounts"] if m["name"] == volume)


def compose_service(name: str) -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"][name]


def study_name(study: str) -> str:
    """The name inside a study file given to `start --study` (a packaged study's name, or a path)."""
    path = ROOT / study if (ROOT / study).is_file() else ROOT / "nkat_search" / "studies" / f"{study}.toml"
    return tomllib.loads(path.read_text())["study"]["name"]


def seconds(duration: str) -> int:
    """A compose duration such as 30s, 2m or 1m30s in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", duration))


@pytest.fixture(scope="module")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        reason = "kubernetes-validate not installed (pip install kubernetes-validate)"
        if ci():
            pytest.fail(reason + "; CI must validate the Kubernetes manifests", pytrace=False)
        pytest.skip(reason)
    return kubernetes_validate


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda f: f.name)
def test_kustomization_lists_every_manifest_in_the_folder(folder):
    listed = kustomization(folder)["resources"]
    on_disk = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    # the report runs the image the search ran, as shipped and after `kustomize edit set image` in both
    assert [i["name"] for i in kustomization(folder)["images"]] == ["nkat-search"]
    assert kustomization(folder)["images"] == kustomization()["images"]


@pytest.mark.parametrize("version", [K8S_OLDEST, "newest"])
def test_every_manifest_is_valid_against_the_kubernetes_schemas(kubernetes_validate, version):
    version = kubernetes_validate.latest_version() if version == "newest" else version
    errors = []
    for name, doc in manifests():
        try:
            # strict: a misspelt or misplaced field is an error, not silently dropped by the API server
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(
                f"{name} {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}"
            )
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda f: f.name)
def test_kustomize_build_renders_valid_manifests(kubernetes_validate, folder):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; `kubectl kustomize` renders the kustomization offline")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert len(rendered) == len(manifests((folder,)))
    for doc in rendered:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def scalars(node, key: str = ""):
    """(key, value) for every scalar of a parsed YAML document, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from scalars(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from scalars(v, key)
    else:
        yield key, node


def test_no_password_literal_in_any_manifest():
    compose_example_password = re.search(r"^POSTGRES_PASSWORD=(.+)$", (ROOT / ".env.example").read_text(), re.M).group(
        1
    )
    for name, doc in manifests():
        # Secrets are created with `kubectl create secret` (README.md), so no value is ever committed
        assert doc["kind"] != "Secret", f"{name} holds a Secret"
        for key, value in scalars(doc):
            assert "password" not in key.lower(), f"{name}: {key}: {value!r} is a literal"
            assert not re.search(r"://[^:/@\s]+:[^@\s]+@", str(value)), f"{name}: {key} has a password in a URL"
            assert str(value) != compose_example_password, f"{name}: {key}"
    for owner, spec in pod_specs().items():
        for c in containers(spec):
            for key, var in env(c).items():
                if "PASSWORD" in key or key == "NKAT_SEARCH_STORAGE":
                    assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), (
                        f"{owner}/{c['name']}: {key} must come from a Secret"
                    )


def test_the_readme_creates_every_secret_the_pods_read():
    readme = re.sub(r"\\\n\s*", "", K8S_README.read_text())  # join continued lines
    refs = {
        (var["valueFrom"]["secretKeyRef"]["name"], var["valueFrom"]["secretKeyRef"]["key"])
        for spec in pod_specs().values()
        for c in containers(spec)
        for var in env(c).values()
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    assert refs == {STORAGE_SECRET, ("nkat-search-postgres", "password")}
    for name, key in refs:
        assert f"kubectl create secret generic {name} --from-literal={key}=" in readme, (name, key)
    # the URL the README stores reaches the bundled database under its Service name, user and database
    url = re.search(r"--from-literal=url=\"(postgresql\+psycopg://[^\"]+)\"", readme).group(1)
    postgres = env(container(pod_specs()["nkat-search-postgres"], "postgres"))
    user, db = postgres["POSTGRES_USER"]["value"], postgres["POSTGRES_DB"]["value"]
    assert re.fullmatch(rf"postgresql\+psycopg://{user}:\$\w+@nkat-search-postgres:5432/{db}", url), url


def test_nothing_is_reachable_from_outside_the_cluster():
    for name, doc in manifests():
        assert doc["kind"] != "Ingress", name
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{name}: {doc['spec'].get('type')}"
            assert all("nodePort" not in p for p in doc["spec"]["ports"]), name
    for owner, spec in pod_specs().items():
        assert not spec.get("hostNetwork"), owner
        for c in containers(spec):
            assert all("hostPort" not in p for p in c.get("ports", [])), f"{owner}/{c['name']} has a hostPort"


def test_dashboard_is_a_clusterip_service_in_front_of_the_compose_command():
    service = resource("Service", "nkat-search-dashboard")
    assert service["spec"]["type"] == "ClusterIP"
    spec = pod_specs()["nkat-search-dashboard"]
    dashboard = container(spec, "dashboard")
    # 0.0.0.0 inside the pod is how the Service reaches it; the Service stays inside the cluster
    assert dashboard["command"] == compose_service("dashboard")["command"]
    ports = {p["name"]: p["containerPort"] for p in dashboard["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert str(ports[service["spec"]["ports"][0]["targetPort"]]) == dashboard["command"][-1]
    selector = service["spec"]["selector"]
    assert (
        selector.items()
        <= resource("Deployment", "nkat-search-dashboard")["spec"]["template"]["metadata"]["labels"].items()
    )


def test_workers_are_an_indexed_job_of_one_gpu_pods():
    job = resource("Job", "nkat-search-workers")["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] >= 1
    worker = container(job["template"]["spec"], "worker")
    assert worker["command"] == compose_service("worker")["command"] == ["nkat-search", "worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize(
    "job_name, container_name", [("nkat-search-workers", "worker"), ("nkat-search-report", "report")]
)
def test_gpu_jobs_retry_failures_but_fail_at_once_on_a_configuration_mistake(job_name, container_name):
    job = resource("Job", job_name)["spec"]
    assert job["backoffLimit"] >= 1
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    # a configuration mistake (exit 2) fails the Job instead of burning its retries
    fail_job = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail_job[0]["onExitCodes"] == {"containerName": container_name, "operator": "In", "values": [2]}


def test_workers_get_time_to_fail_and_requeue_their_trial_on_sigterm():
    grace = resource("Job", "nkat-search-workers")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # at least what compose gives a worker on `docker stop`, and well past the default 30 s
    assert grace >= max(60, seconds(compose_service("worker")["stop_grace_period"]))


def test_every_nkat_search_container_shares_the_image_storage_and_study():
    study_names = set()
    for owner, spec in pod_specs().items():
        for c in containers(spec):
            if c["image"].split(":")[0] != "nkat-search":
                continue
            assert c["image"] == IMAGE == compose_service("worker")["image"], f"{owner}/{c['name']}"
            variables = env(c)
            if c["command"][:2] != ["nkat-search", "download"]:
                ref = variables["NKAT_SEARCH_STORAGE"]["valueFrom"]["secretKeyRef"]
                assert (ref["name"], ref["key"]) == STORAGE_SECRET, f"{owner}/{c['name']}"
            if "NKAT_SEARCH_STUDY" in variables:
                study_names.add(variables["NKAT_SEARCH_STUDY"]["value"])
    start = container(pod_specs()["nkat-search-start"], "start")["command"]
    assert start[:2] == ["nkat-search", "start"]
    assert start[start.index("--workers") + 1] == "0"  # creates the study and records the budget only
    # the workers attach to the study that the start Job creates, the same one compose uses
    created = study_name(start[start.index("--study") + 1])
    assert study_names == {created}
    assert compose_service("worker")["environment"]["NKAT_SEARCH_STUDY"].endswith(f":-{created}}}")


def test_datasets_are_downloaded_once_onto_a_shared_volume_the_workers_read():
    claim = resource("PersistentVolumeClaim", "nkat-search-datasets")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # one volume, worker pods on many nodes
    start = pod_specs()["nkat-search-start"]
    download = start["initContainers"][0]
    assert download["command"][:3] == ["nkat-search", "download", "--data-root"]
    root = download["command"][3]
    assert mount(start, download, "nkat-search-datasets")["mountPath"] == root
    for owner, name in (
        ("nkat-search-start", "start"),
        ("nkat-search-workers", "worker"),
        ("nkat-search-report", "report"),
    ):
        spec = pod_specs()[owner]
        c = container(spec, name)
        assert env(c)["NKAT_SEARCH_DATA_ROOT"]["value"] == root, owner
        assert mount(spec, c, "nkat-search-datasets")["mountPath"] == root, owner
        if owner != "nkat-search-start":
            assert mount(spec, c, "nkat-search-datasets").get("readOnly") is True, owner
    workers = pod_specs()["nkat-search-workers"]
    # the workers start only once the study exists, and `start` creates it after fetching the data
    wait = workers["initContainers"][0]
    assert "nkat-search status" in " ".join(wait["command"])


def test_report_is_a_kustomization_of_its_own_on_what_the_search_created():
    # `kubectl apply -k deploy/kubernetes` starts the search only; the report comes once it is done
    assert REPORT.name not in [r.strip("./") for r in kustomization()["resources"]]
    search = {(doc["kind"], doc["metadata"]["name"]) for _, doc in manifests((K8S,))}
    report = {(doc["kind"], doc["metadata"]["name"]) for _, doc in manifests((REPORT,))}
    assert report == {("Job", "nkat-search-report")}
    assert not search & report
    # and it reuses the search's claims instead of creating (or, on `delete -k`, removing) its own
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod_specs()["nkat-search-report"]["volumes"]}
    assert claims == {"nkat-search-datasets", "nkat-search-artifacts"}
    assert {("PersistentVolumeClaim", c) for c in claims} <= search


def test_report_writes_the_artifact_store_that_the_dashboard_serves():
    claim = resource("PersistentVolumeClaim", "nkat-search-artifacts")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the report pod and the dashboard pod, any nodes
    store = compose_service("dashboard")["environment"]["NKAT_SEARCH_ARTIFACTS"]
    report_spec, dashboard_spec = pod_specs()["nkat-search-report"], pod_specs()["nkat-search-dashboard"]
    report, dashboard = container(report_spec, "report"), container(dashboard_spec, "dashboard")
    for spec, c in ((report_spec, report), (dashboard_spec, dashboard)):
        assert mount(spec, c, "nkat-search-artifacts")["mountPath"] == store, c["name"]
        assert env(c)["NKAT_SEARCH_ARTIFACTS"]["value"] == store, c["name"]
    assert mount(report_spec, report, "nkat-search-artifacts").get("readOnly") is not True
    assert mount(dashboard_spec, dashboard, "nkat-search-artifacts").get("readOnly") is True
    command = report["command"]
    assert command[:2] == ["nkat-search", "report"] and "--artifacts" not in command  # the store from the env
    assert report["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the report's folder holds the state a retried pod resumes from: on the volume, not in the pod
    assert command[command.index("--out") + 1].startswith(store + "/")


def test_postgres_keeps_its_data_on_a_claim_behind_a_headless_service():
    service = resource("Service", "nkat-search-postgres")
    assert service["spec"]["clusterIP"] == "None"
    statefulset = resource("StatefulSet", "nkat-search-postgres")["spec"]
    assert statefulset["serviceName"] == "nkat-search-postgres"
    claims = {t["metadata"]["name"] for t in statefulset["volumeClaimTemplates"]}
    postgres = container(statefulset["template"]["spec"], "postgres")
    assert {m["name"] for m in postgres["volumeMounts"]} <= claims
    # the compose file's default (its POSTGRES_IMAGE may name a locally built one instead)
    assert f"${{POSTGRES_IMAGE:-{postgres['image']}}}" == compose_service("postgres")["image"]
    # args, not command: a command would replace the entrypoint that initialises the database
    assert "command" not in postgres and postgres["args"] == compose_service("postgres")["command"]
    assert "pg_isready" in postgres["readinessProbe"]["exec"]["command"]
    assert env(postgres)["PGDATA"]["value"].startswith(postgres["volumeMounts"][0]["mountPath"] + "/")


def test_clusters_doc_counts_the_connections_a_worker_holds():
    from nkat_search.storage import urls

    if not hasattr(urls, "LOCK_CONNECTIONS"):
        pytest.skip(
            "nkat_search.storage.urls does not name its pool sizes (POOL_SIZE, POOL_OVERFLOW, LOCK_CONNECTIONS)"
        )
    per_worker = urls.POOL_SIZE + urls.POOL_OVERFLOW + urls.LOCK_CONNECTIONS
    doc = " ".join((ROOT / "docs" / "clusters.md").read_text().split())
    assert f"at most {per_worker} connections per worker process" in doc
    max_connections = int(
        re.search(r"max_connections=(\d+)", " ".join(compose_service("postgres")["command"])).group(1)
    )
    assert f"= {(max_connections - 3 - per_worker) // per_worker} workers" in doc


# ---------------------------------------------------------------------------------------------
# Slurm: the batch script under stub srun/scontrol/nkat-search


STORAGE_URL = "postgresql+psycopg://nkat:s3cret-pw@db-host:5432/nkat"


def sbatch_directives() -> dict[str, str]:
    """The #SBATCH options sbatch reads: those before the first command of the script."""
    options = {}
    for line in SBATCH.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            key, _, value = line.split(None, 1)[1].partition("=")
            options[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return options


def test_sbatch_directives_ask_for_an_array_of_one_gpu_tasks_signalled_before_the_limit():
    options = sbatch_directives()
    assert re.fullmatch(r"0-\d+", options["--array"])
    assert options["--gres"] == "gpu:1"
    assert "--requeue" in options
    # without "B:" the signal reaches the job steps (the worker srun started), not only the shell
    signal_spec = re.fullmatch(r"TERM@(\d+)", options["--signal"])
    assert signal_spec and int(signal_spec.group(1)) >= 60
    directives_anywhere = [ln for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert len(directives_anywhere) == len(options), "an #SBATCH line after the first command is ignored by sbatch"


STUB_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_DIR/srun.argv"
while [[ "$1" == -* ]]; do shift; done
exec "$@"
"""
STUB_NKAT_SEARCH = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_DIR/nkat-search.argv"
printf '%s' "${NKAT_SEARCH_STORAGE:-}" > "$STUB_DIR/nkat-search.storage"
exit "${STUB_EXIT:-0}"
"""
STUB_SCONTROL = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_DIR/scontrol.argv"
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("nkat-search", STUB_NKAT_SEARCH), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def run_sbatch_script(stubs: Path, *args: str, path: str | None = None, **variables: str):
    environ = {
        "PATH": f"{stubs / 'bin'}:{path or os.environ['PATH']}",
        "STUB_DIR": str(stubs),
        "HOME": str(stubs),
        "SLURM_JOB_ID": "80",
        "SLURM_ARRAY_JOB_ID": "77",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_JOB_NODELIST": "gpu-node-7",
        **variables,
    }
    return subprocess.run(
        ["bash", str(SBATCH), *args], capture_output=True, text=True, env=environ, cwd=stubs, timeout=30
    )


def argv(stubs: Path, program: str) -> list[str] | None:
    path = stubs / f"{program}.argv"
    return path.read_text().splitlines() if path.exists() else None


@pytest.mark.parametrize(
    "args, variables, study",
    [
        (("from-arg",), {"NKAT_SEARCH_STUDY": "from-env"}, "from-arg"),
        ((), {"NKAT_SEARCH_STUDY": "from-env"}, "from-env"),
        ((), {}, "nkat-round2"),
    ],
)
def test_sbatch_script_starts_one_worker_on_the_study(stubs, args, variables, study):
    done = run_sbatch_script(stubs, *args, NKAT_SEARCH_STORAGE=STORAGE_URL, **variables)
    assert done.returncode == 0, done.stderr
    assert argv(stubs, "srun") == ["--ntasks=1", "nkat-search", "worker", "--study", study]
    assert argv(stubs, "nkat-search") == ["worker", "--study", study]
    # the URL reaches the worker through the environment, never on a command line (ps, squeue)
    assert (stubs / "nkat-search.storage").read_text() == STORAGE_URL
    assert "s3cret-pw" not in done.stdout + done.stderr
    assert argv(stubs, "scontrol") is None


def assert_refused(done, stubs: Path, *words: str) -> None:
    assert done.returncode == 2
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and message.endswith("."), message
    assert all(w in message for w in words), message
    assert argv(stubs, "srun") is None


def test_sbatch_script_refuses_to_start_without_a_storage_url(stubs):
    done = run_sbatch_script(stubs, "nkat-round2")
    assert_refused(done, stubs, "NKAT_SEARCH_STORAGE is not set", "postgresql+psycopg://")


@pytest.mark.parametrize("url", ["journal:/nfs/home/me/nkat-search.journal", "sqlite:////nfs/home/me/nkat.db"])
def test_sbatch_script_refuses_file_storages_that_nodes_cannot_share(stubs, url):
    done = run_sbatch_script(stubs, NKAT_SEARCH_STORAGE=url)
    assert_refused(done, stubs, "not safe for workers on several nodes", "PostgreSQL")
    assert "/nfs/home" not in done.stderr


def test_sbatch_script_refuses_without_nkat_search_on_path(stubs):
    system_path = "/usr/bin:/bin"
    if shutil.which("nkat-search", path=system_path):
        pytest.skip("nkat-search is installed system-wide")
    (stubs / "bin" / "nkat-search").unlink()
    done = run_sbatch_script(stubs, path=system_path, NKAT_SEARCH_STORAGE=STORAGE_URL)
    assert_refused(done, stubs, "nkat-search is not on PATH")


@pytest.mark.parametrize("exit_code, requeued", [(130, True), (0, False), (1, False), (2, False)])
def test_sbatch_script_requeues_its_own_array_task_only_after_an_interrupt(stubs, exit_code, requeued):
    done = run_sbatch_script(stubs, NKAT_SEARCH_STORAGE=STORAGE_URL, STUB_EXIT=str(exit_code))
    assert done.returncode == exit_code
    # "77_3", not SLURM_JOB_ID: a task's job id can be the array's id, and requeueing that
    # requeues every task of the array
    assert argv(stubs, "scontrol") == (["requeue", "77_3"] if requeued else None)


# ---------------------------------------------------------------------------------------------
# Slurm for real: slurmctld + slurmd on this machine, one node with two fake GPUs


SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
SLURM_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])

SLURM_CONF = """\
ClusterName=nkattest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
# no munge daemon: this cluster is one machine and lives for one test
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
# two character devices stand in for the GPUs, so Slurm sets CUDA_VISIBLE_DEVICES per task
GRES_CONF = "NodeName={host} Name=gpu File=/dev/null,/dev/zero\n"

# First run of each task: wait (30 s at most) for SIGTERM and exit 130 like the worker; after the
# requeue: exit 0 like a worker whose study reached its budget.
REAL_STUB_NKAT_SEARCH = """#!/bin/bash
log="$STUB_DIR/calls.txt"
echo "start task=$SLURM_ARRAY_TASK_ID restart=${SLURM_RESTART_COUNT:-0} gpu=${CUDA_VISIBLE_DEVICES:-none} argv=$* storage=$NKAT_SEARCH_STORAGE" >> "$log"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  trap 'echo "TERM task=$SLURM_ARRAY_TASK_ID" >> "$log"; exit 130' TERM
  echo "ready task=$SLURM_ARRAY_TASK_ID" >> "$log"
  for _ in $(seq 300); do sleep 0.1; done
  exit 1
fi
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def slurm_cluster():
    """A one-node Slurm cluster (slurmctld + slurmd, no munge) for one test; its client environment."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b, path=SLURM_PATH) is None]
    if missing:
        unavailable(
            f"Slurm not installed ({', '.join(missing)} missing; apt-get install -y slurmctld slurmd slurm-client)"
        )
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs")
    host = socket.gethostname().split(".")[0]
    # a short folder: slurmd's step sockets live in the spool folder, and socket paths are <= 107 bytes
    folder = Path(tempfile.mkdtemp(prefix="nkat-slurm-"))
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    conf = folder / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(host=host, dir=folder, ctld_port=free_port(), d_port=free_port(), cpus=os.cpu_count())
    )
    (folder / "gres.conf").write_text(GRES_CONF.format(host=host))
    environ = {**os.environ, "SLURM_CONF": str(conf), "PATH": SLURM_PATH}
    daemons = [
        subprocess.Popen(
            [shutil.which(d, path=SLURM_PATH), "-D", *extra],
            env=environ,
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for d, extra in (("slurmctld", ["-i"]), ("slurmd", ["-N", host]))
    ]

    def sinfo_idle() -> bool:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=environ)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    try:
        try:
            until(sinfo_idle, 30, "the Slurm node to be idle")
        except AssertionError as exc:
            logs = {
                name: (folder / name).read_text()[-2000:] if (folder / name).exists() else "(none)"
                for name in ("slurmctld.log", "slurmd.log")
            }
            raise AssertionError(f"{exc}\n" + "\n".join(f"--- {k}\n{v}" for k, v in logs.items())) from None
        yield environ
    finally:
        subprocess.run(["scancel", "--user", "root"], env=environ, capture_output=True, timeout=30)
        for daemon in reversed(daemons):
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(folder, ignore_errors=True)


def job_states(environ: dict, job: str) -> dict[str, tuple[str, int]]:
    """{array task id: (state, restarts)} of a job array."""
    done = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=environ)
    states = {}
    for line in done.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        states[fields.get("ArrayTaskId", "")] = (fields["JobState"], int(fields["Restarts"]))
    return states


@pytest.mark.slow
def test_real_slurm_runs_the_array_and_requeues_tasks_stopped_by_sigterm(slurm_cluster, tmp_path):
    stub_dir = tmp_path / "stubs"
    (stub_dir / "bin").mkdir(parents=True)
    (stub_dir / "bin" / "nkat-search").write_text(REAL_STUB_NKAT_SEARCH)
    (stub_dir / "bin" / "nkat-search").chmod(0o755)
    environ = {
        **slurm_cluster,
        "PATH": f"{stub_dir / 'bin'}:{slurm_cluster['PATH']}",
        "STUB_DIR": str(stub_dir),
        "NKAT_SEARCH_STORAGE": STORAGE_URL,
        "NKAT_SEARCH_STUDY": "from-env",
    }
    calls = stub_dir / "calls.txt"

    def lines(prefix: str) -> list[str]:
        return [ln for ln in calls.read_text().splitlines() if ln.startswith(prefix)] if calls.exists() else []

    # the partition's node is small: command-line options override the script's #SBATCH lines
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--mem=50M", "--cpus-per-task=1", str(SBATCH), "nkat-smoke"],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp_path,
        timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    until(lambda: len(lines("ready")) == 2, 30, "both array tasks to start their worker")
    first = lines("start")
    assert sorted(re.search(r"task=(\d)", ln).group(1) for ln in first) == ["0", "1"]
    assert sorted(re.search(r"gpu=(\S+)", ln).group(1) for ln in first) == ["0", "1"]  # one GPU each
    assert all(f"argv=worker --study nkat-smoke storage={STORAGE_URL}" in ln for ln in first)

    # what --signal=TERM@120 does before the time limit: SIGTERM to the job steps, not the batch shell
    subprocess.run(["scancel", "--signal=TERM", job], env=environ, check=True, timeout=30)
    until(lambda: len(lines("TERM")) == 2, 30, "the workers to receive SIGTERM")

    def requeued() -> dict:
        states = job_states(environ, job)
        return states if states and all(v == ("PENDING", 1) for v in states.values()) else {}

    assert set(until(requeued, 30, "both tasks to be requeued")) == {"0", "1"}
    for task in ("0", "1"):  # Slurm holds a requeued job back for a while; start it now
        subprocess.run(["scontrol", "update", f"JobId={job}_{task}", "StartTime=now"], env=environ, check=True)
    until(lambda: len(lines("start")) == 4, 60, "the requeued tasks to start again")
    assert sorted(re.search(r"restart=(\d)", ln).group(1) for ln in lines("start")[2:]) == ["1", "1"]
    until(
        lambda: not job_states(environ, job) or all(s == "COMPLETED" for s, _ in job_states(environ, job).values()),
        60,
        "the tasks to complete",
    )
    logs = "".join(p.read_text() for p in tmp_path.glob("nkat-search-worker-*.out"))
    assert f"requeueing {job}_0" in logs and f"requeueing {job}_1" in logs
