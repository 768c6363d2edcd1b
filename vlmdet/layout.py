"""Where each step of a run writes in the run folder, and the key that says what produced it.

    WORKDIR/config.json                  the configuration the run used (profile resolved)
    WORKDIR/data/<data_key>/{raw,prepared}
    WORKDIR/train/<training_key>[-<run>]  a forced run trains from the base in a folder of its own
    WORKDIR/eval/<name>                  adapter, base, champion, merged
    WORKDIR/merged, WORKDIR/steps/merge  one merge at a time (a 7B merge is 15 GB)
    WORKDIR/gate/<name>                  decision.md and the disagreement picture
    WORKDIR/summary.json, last_success.json, .prefect-results

Each heavy step's key covers its output folder and every input (vlmdet.keys); a marker file beside
the output records which key produced it, so a cache (Prefect's) is trusted only while the folder
still holds that output: Prefect keeps the result record, not the files it points to.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from vlmdet.config import RunConfig
from vlmdet.keys import EVAL_EXECUTION_ONLY, data_key, marker_matches, path_stamp, step_key, training_key
from vlmdet.records import AdapterRef, DatasetRef


@dataclass(frozen=True)
class RunLayout:
    root: Path
    run_id: str = "manual"  # names the training folder of a forced run (the flow run's id under Prefect)

    @classmethod
    def at(cls, workdir: str | Path, run_id: str | None = None) -> "RunLayout":
        return cls(Path(workdir).resolve(), (run_id or "manual").replace("-", "")[:8])

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def config_file(self) -> Path:
        return self.path("config.json")

    @property
    def summary_file(self) -> Path:
        return self.path("summary.json")

    @property
    def last_success_file(self) -> Path:
        return self.path("last_success.json")

    @property
    def results(self) -> Path:
        """Prefect's persisted task results beside the files they describe: they live and go with the
        work folder (a volume that outlives a Docker or Kubernetes worker), not the worker's home."""
        return self.path(".prefect-results")

    # --- prepare ---
    def data_dir(self, config: RunConfig) -> Path:
        """Each data configuration has its own folder: runs on different data never read each other's files."""
        return self.path("data", data_key(config))

    def prepared_exists(self, config: RunConfig) -> bool:
        return (self.data_dir(config) / "prepared" / "report.json").is_file()

    def prepare_key(self, config: RunConfig, stamp: str) -> str:
        blob = json.dumps({"dir": str(self.data_dir(config)), "source": stamp})
        return "prepare-" + hashlib.sha256(blob.encode()).hexdigest()[:24]

    # --- train ---
    def train_dir(self, dataset: DatasetRef, config: RunConfig, fresh: bool = False) -> Path:
        if config.train.profile == "auto":
            # the folder is named by what the profile sets (quantization, batch split): resolve it first,
            # once, where the run starts (vlmdet.pipeline.resolve), so every step sees the same choice
            raise ValueError("train.profile=auto reached the run layout unresolved; resolve the configuration "
                             "with vlmdet.pipeline.resolve (or training.profiles.resolve) first")
        key = training_key(config, dataset.fingerprint)
        return self.path("train", key + (f"-{self.run_id}" if fresh else ""))

    def train_key(self, dataset: DatasetRef, config: RunConfig, fresh: bool = False) -> str:
        return step_key("train", self.train_dir(dataset, config, fresh))

    def train_done(self, dataset: DatasetRef, config: RunConfig, fresh: bool = False) -> bool:
        out = self.train_dir(dataset, config, fresh)
        return (out / "adapter" / "adapter_config.json").is_file() and marker_matches(out, step_key("train", out))

    # --- evaluate ---
    def eval_dir(self, name: str) -> Path:
        return self.path("eval", name)

    def eval_key(self, model: str, dataset: DatasetRef, config: RunConfig, name: str) -> str:
        cfg = config.to_dict()
        return step_key("evaluate", self.eval_dir(name), model=path_stamp(model), data=dataset.fingerprint,
                        eval={k: v for k, v in cfg["eval"].items() if k not in EVAL_EXECUTION_ONLY},
                        model_settings=cfg["model"], category=cfg["data"]["category"])

    def eval_done(self, model: str, dataset: DatasetRef, config: RunConfig, name: str) -> bool:
        """True while eval/NAME holds the evaluation this key produced (not another model's)."""
        out = self.eval_dir(name)
        return (out / "predictions.json").is_file() and marker_matches(out, self.eval_key(model, dataset, config, name))

    # --- merge ---
    @property
    def merged_dir(self) -> Path:
        return self.path("merged")

    @property
    def merge_step_dir(self) -> Path:
        return self.path("steps", "merge")

    def merge_key(self, adapter: AdapterRef, dataset: DatasetRef, config: RunConfig) -> str:
        return step_key("merge", self.merged_dir, adapter=path_stamp(adapter.path), data=dataset.fingerprint,
                        model_settings=config.to_dict()["model"], split=config.eval.split)

    def merge_done(self, adapter: AdapterRef, dataset: DatasetRef, config: RunConfig) -> bool:
        """True while merged/ holds this adapter's merge."""
        return (self.merged_dir / "config.json").is_file() and \
            marker_matches(self.merge_step_dir, self.merge_key(adapter, dataset, config))

    # --- gate ---
    def gate_dir(self, name: str) -> Path:
        return self.path("gate", name)
