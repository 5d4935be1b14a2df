"""Credentials in a cache URL are used, never shown: every command that takes the URL runs
from it, and nothing any of them printed or wrote (stdout, stderr, progress bars, error
lines, train_config.json, checkpoints, metrics, the local shard cache) holds the password,
the query token or the Hugging Face token.

The cache is served by a StaticServer on 127.0.0.1 (which ignores the Authorization header
and the query string, as a token-checking server would accept them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from crashlab import refused, succeeded

from logitcache.bench.http_server import StaticServer

PASSWORD, QUERY_TOKEN = "SECRETpass", "SECRETtok"
HF_TOKEN = "hf_" + "SECREThf" * 4
SECRETS = (PASSWORD, QUERY_TOKEN, HF_TOKEN, HF_TOKEN[3:])


@pytest.fixture
def served(reference_caches, tmp_path):
    root = tmp_path / "www"
    shutil.copytree(
        reference_caches["topk"], root / "cache", ignore=shutil.ignore_patterns(".locks")
    )
    with StaticServer(root) as server:
        yield server


def secret_url(base: str, path: str = "cache") -> str:
    host = base.removeprefix("http://")
    return f"http://{HF_TOKEN}:{PASSWORD}@{host}/{path}?token={QUERY_TOKEN}&x=1"


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def files_leaking(root: Path) -> list[str]:
    return [
        f"{p}: {leaks(p.read_bytes().decode('latin-1'))}"
        for p in sorted(root.rglob("*"))
        if p.is_file() and leaks(p.read_bytes().decode("latin-1") + str(p))
    ]


def test_no_command_prints_or_saves_a_credential(
    lab, served, train_args, precompute_args, tmp_path
):
    url, work = secret_url(served.url), tmp_path / "work"
    env = {
        "LOGITCACHE_HOME": str(work / "home"),
        "LOGITCACHE_TIMEOUT": "5",
        "LOGITCACHE_RETRIES": "1",
    }
    args = train_args(url, work / "run", steps=2, save_every=1, eval_cache=url)
    args.remove("--quiet")  # the progress bars and status lines too
    outcomes = {
        "inspect": succeeded(lab.run(["inspect", url], env=env)),
        "verify": succeeded(lab.run(["verify", url], env=env)),
        "precompute --config URL": succeeded(
            lab.run(
                [
                    "precompute",
                    "--config",
                    url,
                    "--out",
                    work / "again",
                    "--device",
                    "cpu",
                    "--batch-tokens",
                    "128",
                ],
                env=env,
            )
        ),
        "train": succeeded(lab.run(args, env=env)),
        "train --resume": succeeded(
            lab.run([*train_args(url, work / "run", steps=3, eval_cache=url), "--resume"], env=env)
        ),
    }
    assert "***@127.0.0.1" in outcomes["inspect"].output, outcomes["inspect"].output
    saved = json.loads((work / "run" / "train_config.json").read_text())
    assert saved["cache"].startswith("http://***@127.0.0.1:") and "token=***" in saved["cache"]
    assert (work / "again" / "manifest.json").exists() and (work / "run" / "model").exists()
    for line in (work / "run" / "metrics.jsonl").read_text().splitlines():
        if "step" in json.loads(line):
            last = json.loads(line)["step"]
    assert last == 3  # resumed, not restarted: the redacted settings compared equal

    missing = secret_url(served.url, "nope")
    unreachable = secret_url("http://127.0.0.1:9", "cache")  # discard port: refused at once
    outcomes["missing"] = lab.run(["train", "--cache", missing, "--out", work / "x"], env=env)
    outcomes["unreachable"] = lab.run(["inspect", unreachable], env=env)
    outcomes["bad hf"] = lab.run(["inspect", f"hf://{HF_TOKEN}@datasets/x?token=1"], env=env)
    outcomes["bad hf push"] = lab.run(
        ["push", work / "again", f"hf://models/{HF_TOKEN}/x@@"], env=env
    )
    outcomes["saved run"] = lab.run(
        ["train", "--config", work / "run" / "train_config.json", "--out", work / "y"], env=env
    )
    refused(outcomes["saved run"], "give --cache again with the full URL")
    for name in ("missing", "unreachable", "bad hf", "bad hf push"):
        refused(outcomes[name])
    assert "not a Hub URL" in outcomes["bad hf"].output, outcomes["bad hf"].output

    for name, outcome in outcomes.items():
        assert not leaks(outcome.output), (name, outcome.output[-3000:])
    assert not files_leaking(work)


def test_a_location_shows_its_url_redacted_and_connects_with_the_real_one(served):
    from logitcache.storage import Location, read_manifest

    loc = Location(secret_url(served.url))
    assert not leaks(repr(loc) + loc.shown + loc.shown_of("manifest.json"))
    assert PASSWORD in loc.url and QUERY_TOKEN in loc.path("manifest.json")
    assert loc.path("manifest.json").endswith(f"/cache/manifest.json?token={QUERY_TOKEN}&x=1")
    assert read_manifest(loc).shards  # fetched with the query after each object's path


@pytest.mark.parametrize(
    "url", [f"hf://{HF_TOKEN}@datasets/x", f"hf://models?token={QUERY_TOKEN}", "hf://"]
)
def test_a_malformed_hub_url_is_one_redacted_line(url):
    from logitcache.storage import Location
    from logitcache.storage.errors import CacheError
    from logitcache.storage.hub import HubTarget

    for make in (Location, HubTarget.parse):
        with pytest.raises(CacheError) as err:
            make(url)
        assert "not a Hub URL" in str(err.value) and "\n" not in str(err.value)
        assert not leaks(str(err.value)), str(err.value)
