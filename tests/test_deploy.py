"""docker-compose.yml against the Compose Specification's JSON schema (no Docker engine here),
plus what the schema cannot say: the services, healthchecks, GPU reservation and image."""

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHECK = Path(sys.executable).parent / "check-jsonschema"


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHECK), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = _validate(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    # The check must be able to fail: a misspelt key is not in the schema.
    broken = (ROOT / "docker-compose.yml").read_text().replace("healthcheck:", "helthcheck:", 1)
    path = tmp_path / "docker-compose.yml"
    path.write_text(broken)
    assert _validate(path).returncode != 0


def test_compose_services_commands_and_gpu_reservation() -> None:
    services = _compose()["services"]
    assert set(services) == {"redis", "api", "worker-cpu", "worker-gpu"}
    for name, service in services.items():
        assert "healthcheck" in service, name
    assert services["api"]["command"][:2] == ["gradstream", "api"]
    assert services["worker-cpu"]["command"] == ["gradstream", "worker", "--device", "cpu"]
    gpu = services["worker-gpu"]
    assert gpu["command"] == ["gradstream", "worker", "--device", "cuda:0"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"
    for name in ("api", "worker-cpu", "worker-gpu"):
        assert services[name]["environment"]["GRADSTREAM_REDIS_URL"] == "redis://redis:6379/0"
    redis_command = services["redis"]["command"]
    assert "--appendonly" in redis_command and "noeviction" in redis_command


def test_dockerfile_copies_what_exists_and_pins_torch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.MULTILINE):
        assert (ROOT / source).exists(), source
    assert dockerfile.count("torch==2.13.0") == 2
    assert 'CMD ["gradstream", "api"' in dockerfile
