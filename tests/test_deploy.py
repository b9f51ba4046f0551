"""docker-compose.yml against the Compose Specification's JSON schema (no Docker engine here),
plus what the schema cannot say: the services, healthchecks, GPU reservation, the ha
profile's replica and sentinels, and the image."""

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from services.config import Settings

ROOT = Path(__file__).resolve().parent.parent
CHECK = Path(sys.executable).parent / "check-jsonschema"
# The ha profile's services (`docker compose --env-file ha.env up`).
HA_SERVICES = ("redis-replica", "sentinel-1", "sentinel-2", "sentinel-3")


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
    assert set(services) == {"redis", "api", "worker-cpu", "worker-gpu", *HA_SERVICES}
    for name, service in services.items():
        assert "healthcheck" in service, name
    assert services["api"]["command"][:2] == ["gradstream", "api"]
    assert services["worker-cpu"]["command"][:4] == ["gradstream", "worker", "--device", "cpu"]
    gpu = services["worker-gpu"]
    assert gpu["command"][:4] == ["gradstream", "worker", "--device", "cuda:0"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"
    for name in ("api", "worker-cpu", "worker-gpu"):
        assert services[name]["environment"]["GRADSTREAM_REDIS_URL"] == "redis://redis:6379/0"
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly" in redis_command and "noeviction" in redis_command
    assert "--maxmemory ${REDIS_MAXMEMORY:-2gb}" in redis_command


def test_compose_keeps_redis_private_with_a_password_and_the_api_behind_keys() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(compose["secrets"]) == {"redis_password", "api_keys"}
    redis_service = services["redis"]
    assert "ports" not in redis_service
    assert "--requirepass" in " ".join(redis_service["command"])
    assert "REDISCLI_AUTH" in " ".join(redis_service["healthcheck"]["test"])
    for name in ("api", "worker-cpu", "worker-gpu"):
        env = services[name]["environment"]
        assert env["GRADSTREAM_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
        assert env["GRADSTREAM_REDIS_SENTINEL_PASSWORD_FILE"] == "/run/secrets/redis_password"
        assert "redis_password" in services[name]["secrets"]
    for name in ("redis", *HA_SERVICES):
        assert "requirepass" in " ".join(services[name]["command"]), name
        assert "REDISCLI_AUTH" in " ".join(services[name]["healthcheck"]["test"]), name
        assert "redis_password" in services[name]["secrets"], name
    assert services["api"]["environment"]["GRADSTREAM_API_KEYS"] == "/run/secrets/api_keys"
    assert [name for name, s in services.items() if "ports" in s] == ["api"]


def _ha_env() -> dict[str, str]:
    lines = (ROOT / "ha.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_the_ha_profile_adds_a_replica_and_three_sentinels_the_services_use() -> None:
    services = _compose()["services"]
    for name in HA_SERVICES:
        assert services[name]["profiles"] == ["ha"], name
    replica = " ".join(services["redis-replica"]["command"])
    assert "--replicaof redis 6379" in replica and "--masterauth" in replica
    # Like the primary it may become: AOF, and the same memory ceiling without eviction.
    assert "--appendonly yes" in replica and "noeviction" in replica
    assert "--maxmemory ${REDIS_MAXMEMORY:-2gb}" in replica
    assert "--masterauth" in " ".join(services["redis"]["command"])
    sentinel = " ".join(services["sentinel-1"]["command"])
    assert "sentinel monitor gradstream redis 6379 2" in sentinel and "--sentinel" in sentinel
    assert "down-after-milliseconds" in sentinel and "auth-pass" in sentinel
    # ha.env turns the profile on and points every gradstream service at those sentinels.
    ha = _ha_env()
    assert ha["COMPOSE_PROFILES"] == "ha"
    settings = Settings(redis_sentinels=ha["REDIS_SENTINELS"])
    assert settings.sentinel_addresses() == [(f"sentinel-{i}", 26379) for i in (1, 2, 3)]
    for name in ("api", "worker-cpu", "worker-gpu"):
        env = services[name]["environment"]
        assert env["GRADSTREAM_REDIS_SENTINELS"] == "${REDIS_SENTINELS:-}"
        assert env["GRADSTREAM_REDIS_MASTER"] == "gradstream"


def test_the_redis_password_file_goes_into_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "redis_password"
    secret.write_text("p@ss/word\n")
    settings = Settings(redis_url="redis://redis:6379/0", redis_password_file=str(secret))
    assert settings.redis_url == "redis://:p%40ss%2Fword@redis:6379/0"


def test_dockerfile_copies_what_exists_and_pins_torch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.MULTILINE):
        for source in sources.split():
            assert (ROOT / source).exists(), source
    # The dashboard's charts come from the lock file's npm ci, copied in where the API looks.
    assert "RUN npm ci" in dockerfile
    assert re.search(
        r"^COPY --from=\S+ \S+/echarts\.min\.js \./api/static/vendor/$", dockerfile, re.M
    )
    assert dockerfile.count("torch==2.13.0") == 2
    assert 'CMD ["gradstream", "api"' in dockerfile
