"""Servers and environments for the remote-cache tests, all on 127.0.0.1.

- ``remote_env`` (use it autouse): the local shard cache under tmp_path, short timeouts.
- ``www`` / ``served``: a directory served by ``FaultyServer`` (HTTP with byte ranges, and
  failures on request).
- ``s3``: a fresh bucket on moto's threaded S3 server, used through s3fs with credentials
  and endpoint from the environment (as a user would set them). Instance-metadata lookups
  are disabled so botocore never looks beyond this machine.

tests/storage/conftest.py imports these fixtures, so every storage test can ask for them.
"""

from __future__ import annotations

import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from storage_synth import make_spec, write_cache

from logitcache.bench.http_server import StaticServer

# Every AWS variable that could point botocore at real credentials or a real endpoint.
_AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture
def remote_env(tmp_path, monkeypatch) -> Path:
    """Local shard cache in tmp_path/home; 5 s timeouts and 2 attempts (tests stay short)."""
    home = tmp_path / "home"
    monkeypatch.setenv("LOGITCACHE_HOME", str(home))
    monkeypatch.setenv("LOGITCACHE_TIMEOUT", "5")
    monkeypatch.setenv("LOGITCACHE_RETRIES", "2")
    return home


def closed_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FaultyServer(StaticServer):
    """``StaticServer`` with failures on request.

    ``fail``: path suffix -> HTTP status answered instead of the file (until removed).
    ``truncate``: path suffix -> how many more times to send half the body and hang up.
    """

    def __init__(self, root, latency: float = 0.0) -> None:
        super().__init__(root, latency)
        self.fail: dict[str, int] = {}
        self.truncate: dict[str, int] = {}
        self._faults = threading.Lock()

    def fault(self, path: str) -> tuple[int | None, bool]:
        with self._faults:
            status = next((s for k, s in self.fail.items() if path.endswith(k)), None)
            cut = next((k for k, n in self.truncate.items() if path.endswith(k) and n > 0), None)
            if cut is not None:
                self.truncate[cut] -= 1
            return status, cut is not None


@pytest.fixture
def www(tmp_path):
    """A FaultyServer over tmp_path/www (empty)."""
    root = tmp_path / "www"
    root.mkdir()
    with FaultyServer(root) as server:
        yield server


@dataclass
class Served:
    server: FaultyServer
    url: str
    spec: object
    records: list


@pytest.fixture
def served(www) -> Served:
    """A 10-sequence cache in 4 shards of 3 at ``{server.url}/c`` (files in server.root/c)."""
    spec = make_spec(shard_sequences=3)
    records = write_cache(www.root / "c", spec, 10)
    return Served(www, f"{www.url}/c", spec, records)


# -- S3 (moto) -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def moto_endpoint():
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def aws_environment(monkeypatch, endpoint: str, credentials: bool = True) -> None:
    """The environment a user of an S3-compatible store sets; nothing else is consulted."""
    for name in _AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an instance remembers its credentials


@pytest.fixture
def s3(moto_endpoint, monkeypatch, remote_env):
    """``s3://<fresh bucket>`` on the moto server, with credentials in the environment."""
    import s3fs

    aws_environment(monkeypatch, moto_endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


def s3_keys(url: str) -> list[str]:
    """Every object under an s3:// prefix, relative to it."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = url[len("s3://") :].rstrip("/")
    return sorted(p[len(root) + 1 :] for p in fs.find(root))
