"""Fixtures for the service tests: real Redis, real PostgreSQL, the session's virtual patient.

Everything listens on loopback. Redis is a private ``redis-server`` on a free port (so the
tests never flush anyone's data); PostgreSQL is the machine's cluster, started if it is
down, with a database created for the session and dropped after it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.localredis import LocalRedis, free_port
from service.main import create_app

from .support import make_settings, zip_folder


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test with real peers and a full pipeline run")


# ------------------------------------------------------------------ environment


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if not Path("/usr/bin/redis-server").exists() and not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server; scripts/bootstrap.sh --test-tools)")
    server = LocalRedis(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server):
    """A Redis database emptied for each test (no task of one test runs in another)."""
    import redis

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushdb()
    return redis_server.url


def _pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"], check=False).returncode == 0


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh database on the machine's PostgreSQL (started if needed), dropped afterwards."""
    if shutil.which("pg_isready") is None:
        pytest.skip("PostgreSQL client tools are not installed")
    if not _pg_ready():
        versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
        if not versions:
            pytest.skip("no PostgreSQL cluster on this machine (/etc/postgresql is empty)")
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"], check=False)
        for _ in range(50):
            if _pg_ready():
                break
            time.sleep(0.2)
        else:
            pytest.skip("PostgreSQL did not start")
    import psycopg

    name = f"spectdose_test_{uuid.uuid4().hex[:10]}"
    admin = "host=127.0.0.1 user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    url = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine

    from service.db import Base

    engine = create_engine(url)
    Base.metadata.drop_all(engine)  # each test starts from empty tables
    engine.dispose()
    return url


# ------------------------------------------------------------------ studies


@pytest.fixture(scope="session")
def phantom_dir(small_study) -> Path:
    """The session's small virtual patient (tests/conftest.py): ``<dir>/dicom/{CT,NM}/*.dcm``."""
    return small_study


@pytest.fixture(scope="session")
def phantom_files(phantom_dir) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(str(phantom_dir / "dicom" / "**" / "*.dcm"), recursive=True))
    assert files, "the phantom wrote no DICOM files"
    return files


@pytest.fixture(scope="session")
def computed_output(phantom_dir, tmp_path_factory, kernel_cache_dir) -> Path:
    """One pipeline run on the phantom (DVK defaults), for tests that need real outputs."""
    from spectdose.pipeline import DoseOptions, run

    out = tmp_path_factory.mktemp("computed")
    run(phantom_dir / "dicom", out, DoseOptions(kernel_cache_dir=kernel_cache_dir))
    return out




# The gateway under test: a module may define its own ``settings`` (limits, peers); ``client``
# and ``study_zip`` then follow it.
@pytest.fixture()
def settings(tmp_path, redis_url):
    return make_settings(tmp_path / "data", redis_url=redis_url, peers=["PACS@127.0.0.1:11113"])


@pytest.fixture()
def client(settings):
    with TestClient(create_app(settings, sweeper=False)) as c:
        yield c


@pytest.fixture(scope="module")
def study_zip(phantom_dir, tmp_path_factory) -> bytes:
    return zip_folder(phantom_dir / "dicom", tmp_path_factory.mktemp("zip") / "study.zip").read_bytes()
