"""docker-compose.yml, Dockerfile and .env.example describe a deployment that is valid and safe."""

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

pytestmark = pytest.mark.infra

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"

# a project install from the checkout: `pip install .`, `pip install -e .`, `pip install -e ".[test]"`
PIP_INSTALL_PROJECT = re.compile(r"""pip install\s+(?:--?[\w-]+\s+)*(?:-e\s+)?["']?\.(?:\[[\w,-]+\])?["']?(?:\s|$)""")


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z_]+=", line))
    return {key: value.strip() for key, value in pairs}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def run_compose_config(env_file: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        reason = "docker-compose not installed (apt-get install -y docker-compose)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(reason + "; CI must validate the compose file", pytrace=False)
        pytest.skip(reason)
    # variables in the shell environment would override the env file
    env = {k: v for k, v in os.environ.items() if k not in env_example()}
    return subprocess.run(
        [binary, "-f", str(COMPOSE), "--env-file", str(env_file), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_compose_config_is_valid_with_env_example(tmp_path):
    env_file = tmp_path / ".env"
    shutil.copy(ENV_EXAMPLE, env_file)
    done = run_compose_config(env_file)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", f"docker-compose warned: {done.stderr}"


def test_compose_refuses_to_run_without_a_password(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(f"{k}={v}" for k, v in env_example().items() if k != "POSTGRES_PASSWORD"))
    done = run_compose_config(env_file)
    assert done.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in done.stderr


def test_env_example_documents_every_variable_the_compose_file_reads():
    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    assert used <= set(env_example()), f"undocumented in .env.example: {used - set(env_example())}"


def test_services_exist_and_worker_reserves_a_gpu():
    services = compose()["services"]
    assert {"postgres", "worker", "dashboard"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert services["worker"]["command"] == ["nkat-search", "worker"]


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
    instructions = [i for i in dockerfile_instructions() if i[0] != "ARG"]
    assert instructions[0][0] == "FROM"
    image = instructions[0][1].split()[0]
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
