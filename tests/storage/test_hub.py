"""``hf://`` caches without the network: our side of the Hub contract.

Pushing is tested against ``FakeHub``, which stands in for ``huggingface_hub.HfApi`` (the
methods push calls, with their keyword arguments) and records every commit; reading against
a stand-in for ``HfFileSystem`` that raises huggingface_hub's own errors. What a real Hub
does with those calls is not tested here (docs/guide.md, "On the Hugging Face Hub").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError
from storage_synth import make_spec, write_cache

from logitcache.storage import (
    CacheError,
    CacheWriter,
    RemoteError,
    copy_cache,
    hub,
    read_manifest,
    remote,
)
from logitcache.storage.location import Location

URL = "hf://datasets/team/cache"


def http_error(status: int, cls=HfHubHTTPError, headers=None) -> Exception:
    request = httpx2.Request("POST", "https://huggingface.co/api/datasets/team/cache/commit/main")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    return cls(f"{status} Client Error", response=response)


class FakeHub:
    """One dataset repository's files, the commits made to it, and failures to inject."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.commits: list[tuple[str, list[str]]] = []
        self.created: list[dict] = []
        self.fail: dict[str, list[Exception]] = {}

    def _maybe_fail(self, name: str) -> None:
        if self.fail.get(name):
            raise self.fail[name].pop(0)

    def create_repo(self, repo_id, *, repo_type, private, exist_ok):
        assert (repo_id, repo_type, exist_ok) == ("team/cache", "dataset", True)
        self._maybe_fail("create_repo")
        self.created.append({"private": private})

    def list_repo_tree(self, repo_id, path_in_repo=None, *, recursive, repo_type, revision):
        self._maybe_fail("list_repo_tree")
        if path_in_repo and not any(p.startswith(f"{path_in_repo}/") for p in self.files):
            raise http_error(404, RemoteEntryNotFoundError)  # the Hub: no such folder (yet)
        for path, data in sorted(self.files.items()):
            if path_in_repo and not path.startswith(f"{path_in_repo}/"):
                continue
            blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
            lfs = {"sha256": hashlib.sha256(data).hexdigest()} if path.endswith(".arrow") else None
            yield SimpleNamespace(path=path, size=len(data), blob_id=blob, lfs=lfs)

    def hf_hub_download(self, repo_id, filename, *, repo_type, revision, local_dir):
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.files[filename])
        return str(path)

    def create_commit(self, repo_id, *, operations, commit_message, repo_type, revision):
        self._maybe_fail("create_commit")
        for op in operations:
            data = op.path_or_fileobj
            self.files[op.path_in_repo] = (
                data if isinstance(data, bytes) else Path(data).read_bytes()
            )
        self.commits.append((commit_message, [op.path_in_repo for op in operations]))


class Tokenizer:
    def save_pretrained(self, directory: str) -> None:
        Path(directory, "tokenizer.json").write_text('{"model": "toy"}')


@pytest.fixture
def fake(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *a, **k: fake)
    monkeypatch.setattr(remote, "BACKOFF_BASE_S", 0.001)
    monkeypatch.setenv("LOGITCACHE_RETRIES", "3")
    return fake


@pytest.fixture
def cache(tmp_path) -> Path:
    """7 shards of 3 sequences (20 sequences), with a tokenizer."""
    spec = make_spec(shard_sequences=3)
    write_cache(tmp_path / "c", spec, 20)
    with CacheWriter(tmp_path / "c", spec) as writer:  # add the tokenizer, rewrite the manifest
        writer.attach_tokenizer(Tokenizer())
        writer.finish(20)
    return tmp_path / "c"


def shard_keys(paths) -> list[str]:
    return [p for p in paths if p.startswith("shards/")]


def test_push_commits_in_batches_with_the_manifest_last(fake, cache, monkeypatch):
    monkeypatch.setattr(hub, "BATCH_FILES", 3)
    result = copy_cache(cache, URL)
    assert (result.copied, result.skipped) == (7, 0) and result.manifest.complete
    assert fake.created == [{"private": True}]
    files_per_commit = [len(paths) for _, paths in fake.commits]
    assert files_per_commit == [3, 3, 2, 2]  # tokenizer + 7 shards in 3s, then manifest + card
    assert fake.commits[0][1][0] == "tokenizer/tokenizer.json"
    assert fake.commits[-1][1] == ["manifest.json", "README.md"]
    assert all("manifest.json" not in paths for _, paths in fake.commits[:-1])
    local = {
        p.relative_to(cache).as_posix(): p.read_bytes()
        for p in cache.rglob("*")
        if p.is_file() and ".locks" not in p.parts
    }
    assert {k: fake.files[k] for k in local} == local  # every file, byte for byte
    card = fake.files["README.md"].decode()
    assert "toy-teacher" in card and "top-6" in card and "logitcache train --cache " + URL in card
    assert "viewer: false" in card and hub.CARD_MARKER in card


def test_a_second_push_uploads_nothing_but_the_manifest(fake, cache):
    copy_cache(cache, URL)
    fake.commits.clear()
    again = copy_cache(cache, URL)
    assert (again.copied, again.skipped, again.bytes_copied) == (0, 7, 0)
    assert [paths for _, paths in fake.commits] == [["manifest.json", "README.md"]]


def test_a_failed_commit_leaves_no_manifest_and_a_rerun_resumes(fake, cache, monkeypatch):
    monkeypatch.setattr(hub, "BATCH_FILES", 3)
    real = fake.create_commit
    calls = {"n": 0}

    def second_commit_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise http_error(500)
        return real(*args, **kwargs)

    monkeypatch.setattr(fake, "create_commit", second_commit_fails)
    with pytest.raises(RemoteError, match=r"after 3 attempts.*rerun the same push"):
        copy_cache(cache, URL)
    assert calls["n"] == 4  # the first batch, then three attempts of the second
    assert "manifest.json" not in fake.files  # what was committed is not listed anywhere
    committed = set(shard_keys(fake.files))
    assert len(committed) == 2
    monkeypatch.setattr(fake, "create_commit", real)
    result = copy_cache(cache, URL)
    uploaded = [p for _, paths in fake.commits[1:] for p in shard_keys(paths)]
    assert committed.isdisjoint(uploaded) and len(uploaded) == 5
    assert (result.copied, result.skipped) == (5, 2)
    assert json.loads(fake.files["manifest.json"])["complete"] is True


def test_429_is_retried_with_backoff_and_401_is_one_line(fake, cache):
    fake.fail["create_commit"] = [http_error(429, headers={"Retry-After": "0"})] * 2
    assert copy_cache(cache, URL).manifest.complete  # two 429s, then the commit goes through
    fake.fail["list_repo_tree"] = [http_error(401)]
    with pytest.raises(RemoteError) as err:
        copy_cache(cache, URL)
    message = str(err.value)
    assert "\n" not in message and "HF_TOKEN" in message and "401" in message


def test_a_zarr_cache_resumes_by_its_files(fake, tmp_path):
    write_cache(tmp_path / "z", make_spec(shard_sequences=3, container="zarr"), 8)
    first = copy_cache(tmp_path / "z", URL, shards="0-1")
    assert first.copied == 2 and all(
        "shard-000002" not in p for _, paths in fake.commits for p in paths
    )
    fake.commits.clear()
    rest = copy_cache(tmp_path / "z", URL)
    assert (rest.copied, rest.skipped) == (1, 2) and rest.manifest.complete
    sent = [p for _, paths in fake.commits for p in paths]
    assert sent and all(p.startswith("shards/shard-000002.zarr/") for p in sent[:-2])


def test_a_partial_push_then_the_rest(fake, cache):
    part = copy_cache(cache, URL, shards="0-2")
    listed = json.loads(fake.files["manifest.json"])
    assert [s["index"] for s in listed["shards"]] == [0, 1, 2] and not listed["complete"]
    assert not part.manifest.complete
    rest = copy_cache(cache, URL)
    assert (rest.copied, rest.skipped) == (4, 3) and rest.manifest.complete


def test_a_damaged_tokenizer_file_is_not_pushed(fake, cache):
    (cache / "tokenizer" / "tokenizer.json").write_text('{"model": "other"}')
    with pytest.raises(CacheError, match=r"tokenizer/tokenizer\.json fails its check"):
        copy_cache(cache, URL)
    assert fake.commits == []


def test_push_refuses_another_cache_and_keeps_a_hand_written_card(fake, cache, tmp_path):
    fake.files["README.md"] = b"# our own card\n"
    copy_cache(cache, URL)
    assert fake.files["README.md"] == b"# our own card\n"
    other = tmp_path / "other"
    write_cache(other, make_spec(shard_sequences=3, k=5), 6)
    with pytest.raises(CacheError, match="holds another cache"):
        copy_cache(other, URL)


def test_push_into_a_folder_of_a_repository(fake, cache):
    copy_cache(cache, f"{URL}@main/caches/v1")
    assert "caches/v1/manifest.json" in fake.files and "README.md" not in fake.files
    assert len(shard_keys(p.removeprefix("caches/v1/") for p in fake.files)) == 7


def test_hub_urls_are_parsed_and_checked():
    target = hub.HubTarget.parse("hf://datasets/org/name@dev/sub/dir")
    assert (target.repo_id, target.revision, target.path) == ("org/name", "dev", "sub/dir")
    assert target.key("manifest.json") == "sub/dir/manifest.json"
    with pytest.raises(CacheError, match="dataset repositories"):
        hub.HubTarget.parse("hf://org/model")
    with pytest.raises(CacheError, match="push"):
        Location(URL).check_writable()  # precompute --out hf:// is refused: push instead


class FlakyFS:
    """Stands in for HfFileSystem: raises the queued errors, then serves ``data``."""

    def __init__(self, errors: list[Exception], data: bytes = b"{}") -> None:
        self.errors, self.data, self.calls = list(errors), data, 0

    def cat_file(self, path, start=None, end=None):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.data


def hf_location(monkeypatch, fs: FlakyFS) -> Location:
    monkeypatch.setattr(remote, "BACKOFF_BASE_S", 0.001)
    monkeypatch.setenv("LOGITCACHE_RETRIES", "3")
    loc = Location(URL)
    loc._fs = fs
    return loc


def test_reading_hf_retries_429_and_5xx(monkeypatch):
    fs = FlakyFS([http_error(429), http_error(503)], b"manifest")
    assert hf_location(monkeypatch, fs).read_bytes("manifest.json") == b"manifest"
    assert fs.calls == 3


def test_reading_hf_gives_up_after_the_attempts(monkeypatch):
    fs = FlakyFS([http_error(502)] * 5)
    with pytest.raises(RemoteError, match=r"cannot reach .* after 3 attempts"):
        hf_location(monkeypatch, fs).read_bytes("manifest.json")
    assert fs.calls == 3


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (http_error(403), "denied"),
        (http_error(401, RepositoryNotFoundError), "no such Hub repository"),
        (FileNotFoundError("x"), None),  # a missing file: callers decide (no manifest.json)
    ],
)
def test_reading_hf_401_403_404_are_one_line(monkeypatch, error, words):
    wrapped = error
    if isinstance(error, FileNotFoundError):  # HfFileSystem wraps the Hub's 404 like this
        wrapped = FileNotFoundError("datasets/team/cache/manifest.json")
    fs = FlakyFS([wrapped] * 3)
    loc = hf_location(monkeypatch, fs)
    if words is None:
        assert loc.read_if_exists("manifest.json") is None and fs.calls == 1
        with pytest.raises(CacheError, match=r"no manifest\.json at hf://datasets/team/cache"):
            read_manifest(loc)
        return
    with pytest.raises(RemoteError) as err:
        loc.read_bytes("manifest.json")
    assert words in str(err.value) and "\n" not in str(err.value) and fs.calls == 1
