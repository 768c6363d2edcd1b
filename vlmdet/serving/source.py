"""Where the served model comes from, and which revision of it is newest.

A local folder (a merged model, an adapter, or a `local:DIR` publication, which the publisher
swaps whole) or a Hub repo id (`ORG/NAME` or `hub:ORG/NAME`) followed on a branch or tag: each
reload asks the Hub for the branch's head and downloads that exact commit, so a model published
while the server runs is picked up without a restart. Each download is a full snapshot in the
Hugging Face cache (~15 GB for a 7B); `prune` deletes the repo's older ones once a new one serves.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from vlmdet.config.specs import split_spec
from vlmdet.run.keys import REPO_ID
from vlmdet.modeling.load import ModelError

log = logging.getLogger(__name__)


class ModelSource:
    def __init__(self, spec: str, *, endpoint: str | None = None, token: str | None = None, revision: str = "main",
                 cache_dir: str | None = None):
        self.spec, self.endpoint, self.token, self.revision, self.cache_dir = spec, endpoint or None, token, revision, cache_dir
        path = Path(spec).expanduser()
        if path.exists():
            if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
                raise ModelError(f"--model {spec!r} is a folder without config.json or adapter_config.json; pass a "
                                  "merged model folder, an adapter folder or a Hub repo id ORG/NAME.")
            self.kind, self.where = "local", str(path.resolve())
            return
        _, repo = split_spec(spec, "--model", ("hub",), default="hub")  # hub:ORG/NAME, or ORG/NAME as it is
        if not REPO_ID.match(repo):
            raise ModelError(f"--model {spec!r} is neither an existing folder nor a Hub repo id (ORG/NAME); "
                              "check the path, or pass hub:ORG/NAME.")
        self.kind, self.where = "hub", repo

    def __str__(self) -> str:
        return self.where if self.kind == "local" else f"hub:{self.where}@{self.revision}"

    def latest(self) -> str:
        """The newest revision: the Hub commit of the followed branch, or the folder's publication."""
        if self.kind == "hub":
            from huggingface_hub import HfApi

            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(self.where, revision=self.revision)
            return info.sha
        folder = Path(self.where)
        meta = folder / "vlmdet.json"
        if meta.is_file():  # a publication: its run id changes with every model published there
            try:
                return "run-" + str(json.loads(meta.read_text())["run_id"])
            except (ValueError, KeyError, TypeError):
                pass
        stamp = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
        return "local-" + hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12]

    def fetch(self, revision: str) -> str:
        """A local folder holding `revision` (downloaded once into the Hugging Face cache)."""
        if self.kind == "local":
            return self.where
        from huggingface_hub import snapshot_download

        return snapshot_download(self.where, revision=revision, endpoint=self.endpoint, token=self.token,
                                 cache_dir=self.cache_dir)

    def prune(self, keep: list[str], count: int) -> list[str]:
        """Delete this repo's cached revisions but `count` of them: those in `keep` (the one serving, the
        one before it) first, then the most recently downloaded others. Returns the deleted commit hashes.

        Through huggingface_hub's cache API, which deletes a snapshot's blobs only when no kept revision
        links them (unchanged files are shared between revisions) and refs before blobs, so an interrupted
        prune never leaves a snapshot pointing at a missing file. Nothing for a local folder or count 0.
        """
        if self.kind != "hub" or count <= 0:
            return []
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir(self.cache_dir)  # the whole cache: one stat per file, seconds for a big one
        mine = [r for r in cache.repos if r.repo_type == "model" and r.repo_id == self.where]
        if not mine:
            return []
        repo = mine[0]
        rank = {h: i for i, h in enumerate(keep)}  # in the order given: with count 1, the serving one stays
        ordered = sorted(repo.revisions, key=lambda r: (rank.get(r.commit_hash, len(keep)), -r.last_modified))
        old = [r.commit_hash for r in ordered[count:]]
        if not old:
            return []
        # Scoped to this repo: delete_revisions matches hashes in every cached repo, and a fork or a
        # duplicated repo can hold the same commit.
        strategy = dataclasses.replace(cache, repos=frozenset({repo})).delete_revisions(*old)
        strategy.execute()
        log.info("pruned %d old revision(s) of %s from the Hugging Face cache (%s freed): %s", len(old), self.where,
                 strategy.expected_freed_size_str, ", ".join(h[:10] for h in old))
        return old
