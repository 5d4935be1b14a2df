"""The commands with URLs: precompute to S3, inspect / verify / push / pull, train from an
HTTP server; and the errors a user sees (one ``error:`` line, exit 1)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result
from servers import closed_port, s3_keys

from logitcache.bench.http_server import StaticServer
from logitcache.cli import main
from logitcache.storage import Location, read_manifest

pytestmark = pytest.mark.usefixtures("remote_env")


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result: Result) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_pull_and_verify_over_http(served, tmp_path):
    url = served.url
    result = invoke("pull", url, tmp_path / "copy", "--shards", "0-1", "--quiet")
    assert result.exit_code == 0, result.output
    assert "pulled: 2 shards" in result.stdout and "(partial)" in result.stdout
    ok = invoke("verify", tmp_path / "copy")
    assert ok.exit_code == 0 and "partial copy: 2 of 4 shards" in ok.stdout
    shown = invoke("inspect", tmp_path / "copy").stdout  # not INCOMPLETE: the pass finished
    assert "(partial copy: 2 of 4 shards," in shown and "INCOMPLETE" not in shown
    result = invoke("pull", url, tmp_path / "copy", "--quiet")
    assert "2 shards" in result.stdout and "2 already there" in result.stdout
    assert "(complete)" in result.stdout
    remote = invoke("verify", url)
    assert remote.exit_code == 0 and "ok: 4 shards, 10 sequences" in remote.stdout
    summary = json.loads(invoke("inspect", url, "--json").stdout)
    assert summary["n_shards"] == 4 and summary["n_sequences"] == 10


def test_a_corrupted_object_is_named_by_verify_and_pull(served, tmp_path):
    path = served.server.root / "c" / "shards" / "shard-000001.arrow"
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    bad = invoke("verify", served.url)
    assert bad.exit_code == 1
    assert "BAD  shard http://" in bad.stderr and "shard-000001.arrow arrived damaged" in bad.stderr
    err = one_error_line(invoke("pull", served.url, tmp_path / "copy", "--quiet"))
    assert "1 of 4 shards were refused" in err and "shard-000001.arrow is damaged" in err


def test_an_unreachable_server_is_one_error_line():
    url = f"http://127.0.0.1:{closed_port()}/cache"
    for args in (["inspect", url], ["verify", url], ["pull", url, "somewhere"]):
        err = one_error_line(invoke(*args))
        assert f"cannot reach {url}/manifest.json after 2 attempts" in err


@pytest.mark.slow
def test_precompute_to_s3_then_train_from_http(s3, tiny_teacher_dir, text_corpus, tmp_path):
    """The whole round: a teacher pass writes to S3, a laptop pulls the cache, serves it over
    HTTP, and a student trains from the URL through the default local shard cache."""
    common = [
        "--teacher",
        tiny_teacher_dir,
        "--data",
        text_corpus,
        "--seq-len",
        32,
        "--shard-sequences",
        8,
        "--top-k",
        8,
        "--device",
        "cpu",
        "--quiet",
    ]
    url = f"{s3}/teacher-pass"
    result = invoke("precompute", *common, "--out", url)
    assert result.exit_code == 0, (result.output, result.exception)
    assert invoke("precompute", *common, "--out", tmp_path / "local").exit_code == 0
    on_s3, local = read_manifest(Location(url)), read_manifest(Location(tmp_path / "local"))
    assert on_s3.complete and on_s3.shards == local.shards  # byte-identical shards
    assert not [k for k in s3_keys(url) if ".tmp" in k or ".locks" in k]
    assert invoke("verify", url).exit_code == 0

    pushed = invoke("push", tmp_path / "local", f"{s3}/pushed", "--quiet")
    assert pushed.exit_code == 0 and f"{len(local.shards)} shards" in pushed.stdout
    pulled = invoke("pull", f"{s3}/pushed", tmp_path / "www" / "cache", "--quiet")
    assert pulled.exit_code == 0 and "(complete)" in pulled.stdout

    student = tmp_path / "student.json"
    student.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 300,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 64,
                "tie_word_embeddings": False,
            }
        )
    )
    with StaticServer(tmp_path / "www") as server:
        result = invoke(
            "train",
            "--cache",
            f"{server.url}/cache",
            "--out",
            tmp_path / "run",
            "--student-config",
            student,
            "--tokenizer",
            tiny_teacher_dir,
            "--steps",
            3,
            "--batch-size",
            4,
            "--eval-fraction",
            0.2,
            "--loader-workers",
            1,
            "--quiet",
        )
        assert result.exit_code == 0, (result.output, result.exception)
        assert any("/cache/shards/" in p for p in server.paths("GET"))
    assert (tmp_path / "run" / "model" / "config.json").exists()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert any("eval_kl" in m for m in metrics)
