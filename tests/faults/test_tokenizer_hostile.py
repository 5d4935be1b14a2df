"""Hostile stored tokenizers (issue #22), made by someone who controls every byte of a cache
and so can make the manifest's hashes vouch for anything.

A tokenizer that names its own code is refused and never run, with or without
``--trust-remote-code`` (a flag or a recipe's ``trust_remote_code: true``): the flag is about
the student. A forged tokenizer (normalizer, decoder, pre-tokenizer, post-processor, chat
template, vocabulary) is refused by ``verify`` and ``train`` alike. A FIFO, a link to
``/dev/zero``, a sparse huge file or a NUL in a listed path: one line, exit 1, bounded memory,
no hang. Each command runs in a forked child (``crashlab``) with a 60 s limit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from crashlab import refused, succeeded

MAX_GROWTH_MB = 256


@pytest.fixture
def own_lab(lab, tmp_path):
    """The session's lab, each run with this test's own $LOGITCACHE_HOME: a tokenizer copy
    verified by an earlier test is reused without reading the cache's files again."""

    class Own:
        def run(self, args, timeout=120):
            return lab.run(args, timeout=timeout, env={"LOGITCACHE_HOME": str(tmp_path / "home")})

    return Own()


def vouch(cache: Path, names: list[str] | None = None) -> None:
    """The manifest made to list ``tokenizer/NAME`` for ``names`` (default: those it lists),
    with their current sizes and hashes."""
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    if names is None:
        names = [Path(f["path"]).name for f in manifest["tokenizer_files"]]
    entries = []
    for name in names:
        data = (cache / "tokenizer" / name).read_bytes()
        entries.append(
            {
                "path": f"tokenizer/{name}",
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    manifest["tokenizer_files"] = entries
    path.write_text(json.dumps(manifest, indent=1))


def edit_tokenizer_json(cache: Path, edit) -> None:
    path = cache / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    vouch(cache)


def check_both(lab, cache: Path, train_args, out: Path, *needles: str, **flags) -> None:
    """``verify`` and ``train`` (the stored tokenizer, no --tokenizer) refuse, naming needles."""
    checked = lab.run(["verify", cache], timeout=60)
    assert checked.code == 1 and "Traceback" not in checked.output, checked.output
    for needle in needles:
        assert needle in checked.output, checked.output
    trained = lab.run(train_args(cache, out, tokenizer=None, **flags), timeout=60)
    refused(trained, *needles)
    assert not (out / "model").exists()
    for outcome in (checked, trained):
        assert outcome.rss_growth_mb < MAX_GROWTH_MB, outcome.rss_growth_mb


# -- code ----------------------------------------------------------------------------------
def plant_code(cache: Path, marker: Path, *, list_py: bool) -> None:
    """tokenizer_config.json names a class in tokenization_evil.py, which writes ``marker``
    when imported; the manifest vouches for the config (and the .py if ``list_py``)."""
    tok = cache / "tokenizer"
    (tok / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    names = [Path(f).name for f in os.listdir(tok) if f.endswith((".json", ".jinja"))]
    vouch(cache, sorted(names) + (["tokenization_evil.py"] if list_py else []))


@pytest.mark.parametrize("list_py", [True, False], ids=["py-listed", "py-unlisted"])
@pytest.mark.parametrize("trust", ["no", "flag", "recipe"])
def test_a_tokenizer_that_names_code_is_refused_and_never_run(
    own_lab, copy_cache, train_args, tmp_path, list_py, trust
):
    cache, marker = copy_cache("topk"), tmp_path / "executed"
    plant_code(cache, marker, list_py=list_py)
    needle = "tokenization_evil.py" if list_py else "auto_map"
    extra = {"trust_remote_code": True} if trust == "flag" else {}
    if trust == "recipe":
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("trust_remote_code: true\n")
        extra = {"config": recipe}
    out = tmp_path / "student"
    check_both(own_lab, cache, train_args, out, needle, **extra)
    exported = own_lab.run(["tokenizer", cache, tmp_path / "tok"], timeout=60)
    refused(exported, needle)
    assert not marker.exists(), "code stored in the cache was executed"


# -- forgeries -----------------------------------------------------------------------------
def lowercase(data):
    data["normalizer"] = {"type": "Lowercase"}


def replace_decoder(data):
    data["decoder"] = {"type": "Replace", "pattern": {"String": "e"}, "content": "3"}


def split_digits(data):
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, data["pre_tokenizer"]],
    }


def add_bos(data):
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|eos|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|eos|>": {"id": "<|eos|>", "ids": [0], "tokens": ["<|eos|>"]}},
    }


def swap_vocab(data):
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]


@pytest.mark.parametrize("edit", [lowercase, replace_decoder, split_digits, add_bos, swap_vocab])
def test_a_forged_tokenizer_is_refused_by_verify_and_train(
    own_lab, copy_cache, train_args, tmp_path, edit
):
    cache = copy_cache("topk")
    edit_tokenizer_json(cache, edit)
    check_both(own_lab, cache, train_args, tmp_path / "s", "is not the one the cache was made with")


def test_a_forged_chat_template_is_refused_by_verify_and_train(
    own_lab, copy_cache, train_args, tmp_path
):
    cache = copy_cache("topk")
    template = cache / "tokenizer" / "chat_template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    vouch(cache)
    check_both(own_lab, cache, train_args, tmp_path / "s", "is not the one the cache was made with")


def test_the_untouched_cache_verifies_and_trains_with_its_stored_tokenizer(
    own_lab, copy_cache, train_args, tmp_path
):
    """The other side of the tests above: the same commands accept the cache as written."""
    cache = copy_cache("topk")
    succeeded(own_lab.run(["verify", cache], timeout=60))
    out = tmp_path / "s"
    succeeded(own_lab.run(train_args(cache, out, tokenizer=None, steps=1), timeout=120))
    assert sorted(
        p.name for p in (out / "model").iterdir() if "token" in p.name or p.suffix == ".py"
    ) == ["tokenizer.json", "tokenizer_config.json"]


# -- unbounded reads -----------------------------------------------------------------------
def fifo(path: Path) -> str:
    path.unlink()
    os.mkfifo(path)
    return "not a regular file"


def dev_zero(path: Path) -> str:
    path.unlink()
    path.symlink_to("/dev/zero")
    return "not a regular file"


def sparse(path: Path) -> str:
    with open(path, "r+b") as fh:
        fh.truncate(8 << 30)  # 8 GiB of holes: a few kB on disk
    return "more than the"


@pytest.mark.parametrize("make", [fifo, dev_zero, sparse])
def test_a_stored_file_that_never_ends_is_refused_in_bounded_memory(
    own_lab, copy_cache, train_args, tmp_path, make
):
    cache = copy_cache("topk")
    needle = make(cache / "tokenizer" / "tokenizer.json")
    check_both(own_lab, cache, train_args, tmp_path / "s", "tokenizer/tokenizer.json", needle)
    refused(own_lab.run(["tokenizer", cache, tmp_path / "tok"], timeout=60), needle)


@pytest.mark.parametrize(
    "path",
    [
        "tokenizer/tok\0enizer.json",
        "tokenizer/tokenizer.json\0.py",
        "tokenizer/evil.py",
        "tokenizer/.hidden",
    ],
)
def test_a_listed_path_that_is_no_tokenizer_file_is_refused(
    own_lab, copy_cache, train_args, tmp_path, path
):
    cache = copy_cache("topk")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["tokenizer_files"][0]["path"] = path
    (cache / "manifest.json").write_text(json.dumps(manifest))
    for args in (
        ["verify", cache],
        ["inspect", cache],
        train_args(cache, tmp_path / "s", tokenizer=None),
    ):
        outcome = own_lab.run(args, timeout=60)
        refused(outcome, "tokenizer file #0")
        assert outcome.rss_growth_mb < MAX_GROWTH_MB
