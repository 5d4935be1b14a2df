"""Reading ``hf://datasets/...`` through huggingface_hub's real ``HfFileSystem``, over HTTP,
from a stand-in for the Hub's read API on 127.0.0.1 (``hub_server.py``)."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner
from hub_server import REPO, FakeHubServer
from storage_synth import assert_records_match, make_spec, write_cache

from logitcache.cli import main
from logitcache.storage import (
    CacheReader,
    CacheWriter,
    RemoteError,
    copy_cache,
    fetch_tokenizer,
    remote,
    verify_cache,
)

pytestmark = pytest.mark.usefixtures("remote_env")
URL = f"hf://datasets/{REPO}"


class Tokenizer:
    def save_pretrained(self, directory: str) -> None:
        with open(f"{directory}/tokenizer.json", "w") as fh:
            fh.write('{"model": "toy"}')


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hub stand-in over a 4-shard cache with a tokenizer; no real waiting anywhere."""
    spec = make_spec(shard_sequences=3)
    records = write_cache(tmp_path / "repo", spec, 10)
    with CacheWriter(tmp_path / "repo", spec) as writer:
        writer.attach_tokenizer(Tokenizer())
        writer.finish(10)
    waits: list[float] = []
    # CI sets HF_HUB_OFFLINE=1 so nothing reaches the real Hub; the stand-in is on 127.0.0.1
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", waits.append)
    monkeypatch.setattr(remote, "BACKOFF_BASE_S", 0.001)
    with FakeHubServer(tmp_path / "repo") as server:
        server.records, server.spec, server.waits = records, spec, waits
        server.options = {"endpoint": server.url}
        yield server


@pytest.fixture
def cli_endpoint(hub, monkeypatch):
    """The CLI reaches the stand-in as a user's FSSPEC_HF='{"endpoint": ...}' would make it."""
    import fsspec.config

    monkeypatch.setattr(fsspec.config, "conf", {"hf": {"endpoint": hub.url}})


def test_a_hub_cache_reads_verifies_and_pulls(hub, tmp_path):
    reader = CacheReader(URL, storage_options=hub.options)
    got = list(reader)
    assert [r.index for r in got] == list(range(10))
    for record in got:
        assert_records_match(hub.spec, record, hub.records[record.index])
    # the stand-in's tokenizer.json is no tokenizer: verify names only that
    (problem,) = verify_cache(URL, hub.options)[1]
    assert "tokenizer does not load" in problem
    result = copy_cache(URL, tmp_path / "pulled", src_options=hub.options)
    assert result.copied == 4 and result.manifest.complete and result.manifest.tokenizer_files
    assert (tmp_path / "pulled" / "tokenizer" / "tokenizer.json").exists()
    assert (fetch_tokenizer(URL, storage_options=hub.options) / "tokenizer.json").exists()


def test_a_429_the_hub_client_gave_up_on_is_retried_here(hub):
    # huggingface_hub tries a download 6 times itself; the 7th answer is our second attempt's
    hub.fail = [("manifest.json", 429, {})] * 7
    start = time.perf_counter()
    assert CacheReader(URL, storage_options=hub.options).manifest.complete
    gets = [p for _, p in hub.requests if p.endswith("manifest.json")]
    assert len(gets) == 8 and time.perf_counter() - start < 5
    # sleep is patched for both: huggingface_hub's waits, then ours, then its first again
    assert hub.waits == [1, 2, 4, 8, 8, remote.BACKOFF_BASE_S, 1]


def test_a_hub_that_keeps_failing_is_one_line_after_the_attempts(hub, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_RETRIES", "2")
    hub.fail = [("manifest.json", 503, {})] * 50
    with pytest.raises(RemoteError, match=r"after 2 attempts") as err:
        CacheReader(URL, storage_options=hub.options)
    assert "\n" not in str(err.value) and "503" in str(err.value)
    assert sum(p.endswith("manifest.json") for _, p in hub.requests) == 12  # 2 x 6


@pytest.mark.parametrize(
    ("url", "failure", "words"),
    [
        ("hf://datasets/team/missing", None, "no such Hub repository"),  # the Hub answers 401
        (URL, ("manifest.json", 403, {}), "denied"),
        (URL, ("manifest.json", 401, {}), "denied"),
    ],
)
def test_401_403_404_are_one_line(hub, cli_endpoint, url, failure, words):
    if failure is not None:
        hub.fail = [failure]
    result = CliRunner().invoke(main, ["inspect", url])
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err
    if words == "no such Hub repository":
        assert "HF_TOKEN" in err


def test_an_absent_manifest_is_not_a_cache(hub, cli_endpoint):
    (hub.root / "manifest.json").unlink()
    result = CliRunner().invoke(main, ["inspect", URL])
    assert result.exit_code == 1 and f"no manifest.json at {URL}/manifest.json" in result.stderr
