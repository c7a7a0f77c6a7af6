"""Models named by their Hugging Face Hub id ("Qwen/Qwen2.5-7B-Instruct") load from the local
Hub cache, the folder ``huggingface-cli download`` (``hf download``) fills, as vLLM and SGLang
find them offline (``HF_HUB_OFFLINE=1``). Nothing is downloaded here.

The cache's layout (huggingface_hub's)::

    <cache>/models--Qwen--Qwen2.5-7B-Instruct/refs/main          the commit "main" points to
    <cache>/models--Qwen--Qwen2.5-7B-Instruct/snapshots/<commit>/  the files of that commit

``<cache>`` is vLLM's ``download_dir`` when given, else ``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (``$XDG_CACHE_HOME`` in place of ``~/.cache``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_cache_dir(download_dir: str | os.PathLike | None = None) -> Path:
    if download_dir is not None:
        return Path(download_dir).expanduser()
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "huggingface" / "hub"


def is_repo_id(name: str) -> bool:
    """``name`` reads as a Hub id ("org/name") and is not a path that exists."""
    return bool(_REPO_ID.fullmatch(name)) and not Path(name).exists()


def snapshot_dir(repo_id: str, revision: str | None = None,
                 download_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached files of ``repo_id`` at ``revision`` (a branch or tag the cache has a ref
    for, or a commit hash; default "main"), or None when the cache does not hold them. A cache
    copied without its refs, holding one snapshot, gives that one when no revision is asked."""
    repo = hub_cache_dir(download_dir) / ("models--" + repo_id.replace("/", "--"))
    wanted = revision or "main"
    commit = wanted if _COMMIT.fullmatch(wanted) else None
    ref = repo / "refs" / wanted
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    if commit is not None and (repo / "snapshots" / commit).is_dir():
        return repo / "snapshots" / commit
    snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
    if revision is None and not (repo / "refs").is_dir() and len(snapshots) == 1:
        return snapshots[0]
    return None


def local_model_dir(model: str | os.PathLike, revision: str | None = None,
                    download_dir: str | os.PathLike | None = None) -> Path:
    """Where ``model`` is on disk: itself when it is a path (or not a Hub id: the caller says
    what is wrong with it), else its snapshot in the Hub cache. A Hub id the cache does not
    hold is a FileNotFoundError saying where it looked and how to fetch it."""
    if not isinstance(model, str) or not is_repo_id(model):
        return Path(model)  # (a revision means nothing for a local path: vLLM ignores it too)
    found = snapshot_dir(model, revision, download_dir)
    if found is None:
        where = hub_cache_dir(download_dir)
        raise FileNotFoundError(
            f"model {model!r} is not a local directory, and the Hugging Face cache {where} holds "
            f"no snapshot of it{f' at revision {revision!r}' if revision else ''}. Nothing is "
            f"downloaded here: fetch it first (`huggingface-cli download {model}"
            f"{f' --revision {revision}' if revision else ''}`), point HF_HUB_CACHE or "
            "--download-dir at the cache that has it, or give the checkpoint's directory")
    return found
