"""The one bounded reader, the one JSON loader and the one redaction helper every untrusted
input goes through."""

from __future__ import annotations

import os

import pytest

from logitcache.core.errors import LogitcacheError
from logitcache.core.untrusted import is_within, load_json, load_json_object, read_local, redact
from logitcache.storage.errors import CacheError
from logitcache.storage.location import Location


def test_read_local_reads_a_regular_file_within_its_limit(tmp_path):
    (tmp_path / "a.json").write_bytes(b"x" * 10)
    assert read_local(tmp_path / "a.json", 10) == b"x" * 10


@pytest.mark.parametrize("kind", ["big", "fifo", "devzero", "dir", "nul", "missing"])
def test_read_local_refuses_in_one_line_without_reading(tmp_path, kind):
    path = tmp_path / "f"
    if kind == "big":
        with open(path, "wb") as fh:  # sparse: 8 GiB declared, nothing written
            fh.truncate(8 << 30)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        path.symlink_to("/dev/zero")
    elif kind == "dir":
        path.mkdir()
    elif kind == "nul":
        path = str(path) + "\0x"
    with pytest.raises(LogitcacheError) as err:
        read_local(path, 1024, what="state file")
    assert "\n" not in str(err.value) and "state file" in str(err.value)


def test_location_read_is_bounded_and_refuses_special_files(tmp_path):
    (tmp_path / "ok.json").write_bytes(b"{}")
    os.mkfifo(tmp_path / "fifo.json")
    loc = Location(tmp_path)
    assert loc.read_bytes("ok.json", limit=2) == b"{}"
    assert loc.read_if_exists("absent.json", limit=2) is None
    with pytest.raises(CacheError, match="more than the 1 allowed"):
        loc.read_bytes("ok.json", limit=1)
    with pytest.raises(CacheError, match="not a regular file"):
        loc.read_bytes("fifo.json", limit=100)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("s3://AKIAXXXX:pa55word@bucket/cache", "pa55word"),
        ("https://user:hunter2@example.org/c?x=1", "hunter2"),
        ("https://h/c?X-Amz-Signature=deadbeef&x=1", "deadbeef"),
        ("https://h/c?token=abc123", "abc123"),
        ("error at hf://datasets/hf_abcdefghijklmnopqrstuvwxyz12@org/x", "abcdefghijklmnop"),
    ],
)
def test_redact_removes_credentials(text, secret):
    assert secret not in redact(text)
    assert "***" in redact(text)


def test_redact_keeps_plain_urls_and_paths():
    for text in ("s3://bucket/cache", "/tmp/x@y/cache", "hf://datasets/org/name", "a@b.c"):
        assert redact(text) == text


def test_is_within(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "link").symlink_to("/tmp")
    assert is_within(tmp_path / "in", tmp_path)
    assert not is_within(tmp_path / "link", tmp_path)
    assert not is_within(tmp_path / ".." / "x", tmp_path)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"[" * 100_000, "is not valid JSON: nested too deeply"),
        (b"[" * 40 + b"]" * 40, "JSON nested over 32 levels deep"),
        (b"{'a': 1}", "is not valid JSON: Expecting property name"),
        (b"\xff{}", "is not valid JSON"),
    ],
)
def test_load_json_refuses_in_one_line_of_the_callers_error(data, reason):
    class Damaged(LogitcacheError):
        pass

    with pytest.raises(Damaged, match=reason) as err:
        load_json(data, "state.json", error=Damaged)
    assert str(err.value).startswith("state.json") and "\n" not in str(err.value)
    with pytest.raises(CacheError, match="not a JSON object"):
        load_json_object(b"[1]", "meta", error=CacheError)
    assert load_json(b"[" * 40 + b"]" * 40, "x", max_depth=None)  # the caller checks it
