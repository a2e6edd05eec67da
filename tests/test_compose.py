"""docker-compose.yml, Dockerfile and .env.example describe a deployment that is valid and safe."""

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, unavailable

pytestmark = pytest.mark.infra

COMPOSE = ROOT / "docker-compose.yml"
# read after COMPOSE by `docker compose` when no -f names the files: the workers' GPUs
GPU_OVERRIDE = ROOT / "docker-compose.override.yml"
# the stack on a CPU-only host, as tests/test_compose_stack.py runs it
CPU_OVERRIDE = ROOT / "deploy" / "docker" / "compose.cpu.yml"
COMPOSE_FILES = (COMPOSE, GPU_OVERRIDE, CPU_OVERRIDE)
# Debian's compose v2 (the trixie package), which scripts/test.sh unpacks there: bookworm has only 1.29
COMPOSE_V2 = ROOT / ".cache" / "docker" / "compose-v2" / "docker-compose"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"

# a project install from the checkout: `pip install .`, `pip install -e .`, `pip install -e ".[test]"`
# (the image adds CI's versions of the dependencies: `-c constraints/ci.txt`)
PIP_INSTALL_PROJECT = re.compile(
    r"""pip install\s+(?:(?:-c|--constraint)\s+\S+\s+|--?[\w-]+\s+)*(?:-e\s+)?["']?\.(?:\[[\w,-]+\])?["']?(?:\s|$)"""
)


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z_]+=", line))
    return {key: value.strip() for key, value in pairs}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_binary(version: str) -> str:
    """docker-compose 1.29 (Debian bookworm's) or compose v2 (Debian trixie's, unpacked by scripts/test.sh)."""
    binary = shutil.which("docker-compose") if version == "v1" else str(COMPOSE_V2) if COMPOSE_V2.exists() else None
    if binary is None:
        install = "apt-get install -y docker-compose" if version == "v1" else "scripts/test.sh unpacks it"
        unavailable(f"docker-compose {version} not installed ({install}); CI must validate the compose files")
    return binary


def run_compose(env_file: Path, *args: str, version: str = "v1", files: tuple[Path, ...] | None = None):
    """`docker-compose [-f FILE...] --env-file ENV_FILE ARGS`; without files, the default files (the
    compose file and its override), as README's commands read them."""
    named = [arg for f in files for arg in ("-f", str(f))] if files else []
    # variables in the shell environment would override the env file
    env = {k: v for k, v in os.environ.items() if k not in env_example()}
    return subprocess.run(
        [compose_binary(version), *named, "--env-file", str(env_file), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=ROOT,
    )


def run_compose_config(env_file: Path, version: str = "v1", files: tuple[Path, ...] | None = None):
    return run_compose(env_file, "config", "-q", version=version, files=files)


def merged_config(files: tuple[Path, ...] | None = None) -> dict:
    """The services as docker-compose 1.29 merges the files (the default files without any)."""
    done = run_compose(ROOT / ".env.example", "config", files=files)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("files", [None, (COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["default", "base", "cpu"])
def test_compose_config_is_valid_with_env_example(tmp_path, version, files):
    env_file = tmp_path / ".env"
    shutil.copy(ENV_EXAMPLE, env_file)
    done = run_compose_config(env_file, version, files)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", f"docker-compose warned: {done.stderr}"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_compose_refuses_to_run_without_a_password(tmp_path, version):
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(f"{k}={v}" for k, v in env_example().items() if k != "POSTGRES_PASSWORD"))
    done = run_compose_config(env_file, version)
    assert done.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in done.stderr


def test_env_example_documents_every_variable_the_compose_files_read():
    used = {name for f in COMPOSE_FILES for name in re.findall(r"\$\{([A-Z_]+)", f.read_text())}
    assert used <= set(env_example()), f"undocumented in .env.example: {used - set(env_example())}"


def test_services_exist_and_readme_commands_reserve_a_gpu_per_worker():
    services = merged_config()  # what `docker compose up` reads: the compose file and its override
    assert {"postgres", "worker", "dashboard"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert services["worker"]["command"] == ["nkat-search", "worker"]


def test_cpu_override_leaves_out_the_gpu_and_keeps_the_rest():
    cpu, default = merged_config((COMPOSE, CPU_OVERRIDE)), merged_config()
    assert "deploy" not in cpu["worker"]
    assert set(cpu) == set(default)
    for name in ("worker", "dashboard"):
        assert {k: v for k, v in cpu[name].items() if k not in ("deploy", "build", "environment")} == {
            k: v for k, v in default[name].items() if k not in ("deploy", "build", "environment")
        }
        assert default[name]["environment"].items() <= cpu[name]["environment"].items()


def test_workers_can_be_scaled():
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_worker_and_dashboard_wait_for_a_healthy_postgres():
    services = compose()["services"]
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    for name in ("worker", "dashboard"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert services[name]["environment"]["NKAT_SEARCH_STORAGE"].startswith("postgresql+psycopg://")


def test_dashboard_serves_the_artifact_volume_that_report_writes_to(monkeypatch):
    from nkat_search.cli.main import build_parser

    services = compose()["services"]
    assert "artifacts" in compose()["volumes"]
    # the dashboard reads the store where `docker compose run --rm worker nkat-search report` writes
    # the image's own ENV, which the service's environment overrides
    image_env = dict(re.findall(r"\b(NKAT_SEARCH_\w+)=(\S+)", (ROOT / "Dockerfile").read_text()))
    for name, argv in (("dashboard", services["dashboard"]["command"][1:]), ("worker", ["report"])):
        monkeypatch.delenv("NKAT_SEARCH_ARTIFACTS", raising=False)
        value = services[name]["environment"].get("NKAT_SEARCH_ARTIFACTS", image_env.get("NKAT_SEARCH_ARTIFACTS"))
        if value is not None:
            monkeypatch.setenv("NKAT_SEARCH_ARTIFACTS", value)
        store = build_parser().parse_args(argv).artifacts  # --artifacts, else its default from the environment
        mounts = {target: volume for volume, target in (v.split(":")[:2] for v in services[name]["volumes"])}
        assert mounts.get(store) == "artifacts", (
            f"{name} keeps its artifact store at {store}, not on the artifacts volume"
        )


def test_published_ports_bind_localhost_only():
    published = [(name, port) for name, svc in compose()["services"].items() for port in svc.get("ports", [])]
    assert published, "postgres and dashboard should publish a port"
    for name, port in published:
        # an unquoted 5432:5432 is a YAML 1.1 base-60 integer, and a bare port binds 0.0.0.0
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port!r}"


def test_no_password_literal_in_compose_file():
    text = COMPOSE.read_text()
    assert env_example()["POSTGRES_PASSWORD"] not in text
    assert not re.search(r"password=", text, re.IGNORECASE)
    for name, svc in compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert str(value).startswith("${"), f"{name}.{key} is a literal"
            url = re.sub(r"\$\{[^}]*\}", "${}", str(value))
            for userinfo_password in re.findall(r"://[^:/@]+:([^@]+)@", url):
                assert userinfo_password == "${}", f"{name}.{key} has a password literal in its URL"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    )
    pairs = [line.strip().split(None, 1) for line in joined.splitlines() if line.strip()]
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in pairs]


def test_dockerfile_builds_on_the_cuda_pytorch_image_matching_the_torch_pin():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", instructions[0][1]) and instructions[1] == ("FROM", "${BASE_IMAGE}")
    name, image = instructions[0][1].split("=", 1)
    assert name == "BASE_IMAGE"
    # docker compose passes BASE_IMAGE from .env, with the same default
    assert compose()["x-nkat-image"]["build"]["args"]["BASE_IMAGE"] == f"${{BASE_IMAGE:-{image}}}"
    assert env_example()["BASE_IMAGE"] == image
    match = re.fullmatch(r"pytorch/pytorch:([\d.]+)-cuda[\d.]+-cudnn\d+-runtime", image)
    assert match, f"not an official CUDA PyTorch runtime image: {image}"
    from packaging.requirements import Requirement

    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints" / "ci.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    torch_range = next(r.specifier for r in deps if r.name == "torch")
    # The image's torch is the one CI tests, and inside pyproject's range: otherwise `pip install .`
    # replaces it with another multi-GB CUDA build.
    assert match.group(1) == pins["torch"] and torch_range.contains(match.group(1))


def test_dockerfile_installs_the_project_like_the_readme():
    runs = [args for instr, args in dockerfile_instructions() if instr == "RUN"]
    assert any(PIP_INSTALL_PROJECT.search(r) for r in runs), f"no RUN pip install . in {runs}"
    if not README.exists():
        pytest.skip("README.md not written yet; cannot compare its install step")
    readme_installs = [ln for ln in README.read_text().splitlines() if "pip install" in ln]
    assert any(PIP_INSTALL_PROJECT.search(ln) for ln in readme_installs), (
        f"README.md should install the project with `pip install -e .` or `pip install .`: {readme_installs}"
    )
