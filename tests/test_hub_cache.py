"""Hugging Face Hub ids ("Org/name") load from the local Hub cache, as vLLM's do offline."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwenjax.hub_cache import hub_cache_dir, local_model_dir, snapshot_dir

MAIN = "a" * 40
TAGGED = "b" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache holding Org/tiny at two commits: "main" and the tag "v1" (other weights),
    laid out as huggingface_hub writes it (blobs, snapshots of links to them, refs)."""
    from tiny import tiny_config, write_hf_checkpoint

    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--Org--tiny"
    for commit, seed in ((MAIN, 0), (TAGGED, 1)):
        written = tmp_path_factory.mktemp(f"written{seed}")
        write_hf_checkpoint(tiny_config(), written, seed=seed)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in written.iterdir():
            blob = repo / "blobs" / f"{commit[:8]}-{file.name}"
            blob.parent.mkdir(exist_ok=True)
            shutil.copy(file, blob)
            (snapshot / file.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(TAGGED + "\n")
    return cache


def test_a_hub_id_is_found_at_its_revision(hub, monkeypatch, tmp_path):
    repo = hub / "models--Org--tiny" / "snapshots"
    assert snapshot_dir("Org/tiny", download_dir=hub) == repo / MAIN
    assert snapshot_dir("Org/tiny", "v1", download_dir=hub) == repo / TAGGED
    assert snapshot_dir("Org/tiny", TAGGED, download_dir=hub) == repo / TAGGED  # a commit
    assert snapshot_dir("Org/tiny", "v2", download_dir=hub) is None
    assert snapshot_dir("Org/other", download_dir=hub) is None
    # The cache's place: download_dir, else $HF_HUB_CACHE, else $HF_HOME/hub.
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    assert hub_cache_dir() == hub.parent / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert hub_cache_dir() == hub and local_model_dir("Org/tiny") == repo / MAIN
    # A path is itself (a revision means nothing for it), even a relative one that looks like
    # an id; "~" in the cache's variables is the home directory, as huggingface_hub reads them.
    assert local_model_dir(str(repo / MAIN), "v1") == repo / MAIN
    monkeypatch.setenv("HOME", str(hub.parent))
    monkeypatch.setenv("HF_HUB_CACHE", "~/" + hub.name)
    assert hub_cache_dir() == hub
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(FileNotFoundError, match=r"holds no snapshot of it at revision 'v2'.*"
                                                r"huggingface-cli download Org/tiny --revision v2"):
        local_model_dir("Org/tiny", "v2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Org" / "tiny").mkdir(parents=True)
    assert local_model_dir("Org/tiny") == Path("Org/tiny")


def test_load_model_and_llm_read_a_hub_id_from_the_cache(hub):
    from qwenjax import LLM, SamplingParams
    from qwenjax.loading import load_model

    repo = hub / "models--Org--tiny" / "snapshots"
    by_id = load_model("Org/tiny", dtype="float32", download_dir=hub)
    by_dir = load_model(str(repo / MAIN), dtype="float32")
    tagged = load_model("Org/tiny", dtype="float32", download_dir=hub, revision="v1")
    assert by_id.source == "Org/tiny" and by_id.files == str(repo / MAIN)
    embedding = lambda lm: np.asarray(lm.weights.embed)  # noqa: E731
    np.testing.assert_array_equal(embedding(by_id), embedding(by_dir))
    assert not np.array_equal(embedding(tagged), embedding(by_dir))  # the other commit's weights
    with pytest.raises(FileNotFoundError, match="neither a preset nor a directory"):
        load_model("not-a-model", dtype="float32")

    options = dict(dtype="float32", max_model_len=64, num_pages=16, page_size=8, warm_up=False,
                   progress=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompt = list(range(3, 15))
    llm = LLM("Org/tiny", download_dir=hub, revision="v1", **options)
    assert llm.generate([prompt], greedy, use_tqdm=False)[0].token_ids == \
        LLM(tagged, **options).generate([prompt], greedy, use_tqdm=False)[0].token_ids


def test_a_lora_adapter_by_hub_id(tmp_path, monkeypatch):
    """vLLM's LoRARequest("sql", 1, "Org/sql-lora"): the adapter's snapshot in the cache."""
    from test_lora import CONFIG, write_adapter
    from tiny import write_hf_checkpoint

    from qwenjax.lora import read_adapter

    write_hf_checkpoint(CONFIG, tmp_path / "base")
    snapshot = tmp_path / "hub" / "models--Org--sql-lora" / "snapshots" / MAIN
    write_adapter(snapshot, tmp_path / "base", rank=4, alpha=8, seed=1)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(MAIN)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert read_adapter("sql", "Org/sql-lora").rank == 4
    with pytest.raises(FileNotFoundError, match="huggingface-cli download Org/other-lora"):
        read_adapter("other", "Org/other-lora")


def test_serve_takes_revision_and_download_dir():
    from server.cli import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["Qwen/Qwen2.5-7B-Instruct", "--revision", "v1", "--download-dir", "/hf"])
    assert (args.model_tag, args.revision, args.download_dir) == ("Qwen/Qwen2.5-7B-Instruct", "v1", "/hf")
    assert not getattr(args, "no_op_flags", None)
