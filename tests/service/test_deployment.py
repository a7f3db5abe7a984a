"""docker-compose.yml and docker/Dockerfile: parsed and cross-checked (no Docker engine here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_describes_the_deployment(compose):
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "gateway", "node", "worker"}
    assert "--appendonly" in services["redis"]["command"], "the broker keeps queued jobs across restarts"
    for name in ("gateway", "node", "worker"):
        svc = services[name]
        env = svc["environment"]
        assert env["SPECTDOSE_REDIS_URL"] == "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0"
        assert env["SPECTDOSE_DATABASE_URL"].startswith("postgresql://")
        assert env["SPECTDOSE_ENVIRONMENT"] == "production"
        assert "${SPECTDOSE_API_TOKENS:?" in env["SPECTDOSE_API_TOKENS"], "no default token"
        assert any(v.startswith("spectdose-data:") for v in svc["volumes"]), f"{name} shares the data volume"
        assert set(svc["depends_on"]) == {"redis", "postgres"}
        assert int(env["SPECTDOSE_VISIBILITY_TIMEOUT_S"]) > int(env["SPECTDOSE_TASK_TIME_LIMIT_S"])
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    assert "cu1" in services["worker"]["build"]["args"]["TORCH_INDEX_URL"]
    assert set(compose["volumes"]) >= {"redis-data", "pg-data", "spectdose-data", "kernel-cache"}
    assert services["gateway"]["ports"] == ["8000:8000"] and services["node"]["ports"] == ["11112:11112"]


def test_compose_commands_are_valid_service_commands(compose):
    parser = build_parser()
    for name in ("gateway", "node", "worker"):
        args = parser.parse_args(compose["services"][name]["command"])
        assert args.command == name
    worker = parser.parse_args(compose["services"]["worker"]["command"])
    assert worker.queues == "gpu,cpu" and worker.concurrency == 1 and "%h" in worker.hostname


def test_dockerfile_copies_existing_paths_and_pins_torch_like_the_project():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \./", text, flags=re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"COPY {part}: not in the repository"
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in pins if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text
    assert 'ENTRYPOINT ["tini", "--", "python", "-m", "service.cli"]' in text


def test_docker_compose_config_when_the_client_has_compose(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose client here; the YAML checks above still ran")
    env = tmp_path / "env"
    env.write_text("SPECTDOSE_API_TOKENS=x" * 1 + "0123456789abcdef\nPOSTGRES_PASSWORD=pw\nREDIS_PASSWORD=pw\n")
    r = subprocess.run([docker, "compose", "--env-file", str(env), "-f", str(ROOT / "docker-compose.yml"), "config",
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
