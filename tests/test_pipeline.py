"""vlmdet.pipeline.run: the step sequence and its branches, the configuration resolved once, the summary.

The steps are fakes that record their calls (no model, no Prefect): what is tested is the order,
which branch runs, what each step is given and what summary.json says.
"""
from __future__ import annotations

import json

import pytest

from vlmdet.pipeline import run as pipeline
from vlmdet.decide.gate import decide
from vlmdet.run.records import AdapterRef, DatasetRef, EvalReport, MergedRef, Publication
from vlmdet.config import profiles


class FakeSteps:
    """A driver that records each step it is asked to run and answers it without a model; evaluate scores
    each model name as `scores` says. cached: every keyed step answers as if from a cache."""

    run_id, read_secret = None, None

    def __init__(self, scores: dict[str, float], cached: bool = False):
        self.calls: list[str] = []
        self.configs: list = []
        self.scores, self.cached = scores, cached

    def __call__(self, step, *args, **kwargs):
        a = step.arguments(*args, **kwargs)
        record = getattr(self, step.name.replace("-", "_"))(**{k: v for k, v in a.items() if v is not None or k == "champion"})
        return record, self.cached and step.key is not None

    def prepare_data(self, config, layout, **_):
        self.calls.append("prepare_data")
        return DatasetRef(fingerprint="f" * 64, root=str(layout.root), splits={"test": "t.json"},
                          counts={"test": {"images": 3}}, source=config.data.dataset)

    def train(self, dataset, config, layout, fresh=False, **_):
        self.calls.append("train" + (" fresh" if fresh else ""))
        self.configs.append(config)
        return AdapterRef(path=str(layout.train_dir(dataset, config, fresh) / "adapter"), base_model="base",
                          family=config.model.family, global_step=2, losses=[1.0, 0.5])

    def evaluate(self, model, dataset, config, layout, name="adapter", **_):
        self.calls.append(f"evaluate {name}")
        v = self.scores[name]
        return EvalReport(map=v, map50=v, map75=v, split="test", num_images=3, parse_failures=0,
                          predictions=str(layout.eval_dir(name) / "predictions.json"), model=model,
                          data_fingerprint=dataset.fingerprint)

    def find_champion(self, config, layout, **_):
        self.calls.append("find champion")
        return None

    def gate(self, report, config, layout, champion=None, name="adapter", **_):
        self.calls.append(f"gate {name}")
        return decide(report, config.gate, champion)

    def merge(self, adapter, dataset, config, layout, **_):
        self.calls.append("merge")
        out = layout.merge_dir(adapter, dataset, config)  # a one-file folder, pinned as the merge pins it
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        return MergedRef.pinned(out, "base", 0.0)

    def publish(self, merged, report, dataset, adapter, decision, config, layout, **_):
        self.calls.append("publish")
        return Publication(target=str(layout.path("published")), kind="local")


def _resolved(**overrides):
    return pipeline.resolve("smoke", {"train.max_steps": 2, "eval.eval_base": False, **overrides}, free_gib=None)


def test_below_the_threshold_nothing_is_merged_and_the_champion_is_not_measured(tmp_path):
    steps = FakeSteps({"adapter": 0.2})
    s = pipeline.run(_resolved(**{"gate.threshold": 0.5}), pipeline.RunLayout.at(tmp_path), steps)
    assert steps.calls == ["prepare_data", "train", "evaluate adapter", "find champion", "gate adapter"]
    assert not s.gate["passed"] and s.published is None and s.merged is None and s.merged_metrics is None
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(s.to_dict()))
    # the summary.json contract (DESIGN.md): metrics, gate, published, adapter
    assert set(on_disk["metrics"]) == {"map", "map50", "map75"} and on_disk["adapter"] == s.adapter
    assert {"threshold", "passed", "reason"} <= set(on_disk["gate"])


def test_a_passing_adapter_is_merged_measured_again_and_published(tmp_path):
    steps = FakeSteps({"adapter": 0.8, "merged": 0.7, "base": 0.1})
    s = pipeline.run(_resolved(**{"gate.threshold": 0.5, "eval.eval_base": True}), pipeline.RunLayout.at(tmp_path),
                     steps)
    assert steps.calls == ["prepare_data", "train", "evaluate adapter", "evaluate base", "find champion",
                           "gate adapter", "merge", "evaluate merged", "gate merged", "publish"]
    assert s.gate["passed"] and s.published["kind"] == "local"
    assert (s.metrics["map50"], s.merged_metrics["map50"], s.base_metrics["map50"]) == (0.8, 0.7, 0.1)


def test_a_merged_model_below_the_gate_is_not_published(tmp_path):
    steps = FakeSteps({"adapter": 0.8, "merged": 0.3})
    s = pipeline.run(_resolved(**{"gate.threshold": 0.5}), pipeline.RunLayout.at(tmp_path), steps)
    assert steps.calls[-3:] == ["merge", "evaluate merged", "gate merged"]
    assert not s.gate["passed"] and s.published is None and s.merged


def test_cached_and_already_decided_is_skipped_until_a_decision_setting_changes(tmp_path):
    layout = pipeline.RunLayout.at(tmp_path)
    first = pipeline.run(_resolved(**{"gate.threshold": 0.5}), layout, FakeSteps({"adapter": 0.2}))
    again = FakeSteps({"adapter": 0.2}, cached=True)
    s = pipeline.run(_resolved(**{"gate.threshold": 0.5}), layout, again)
    assert s.skipped and not s.retrained and "unchanged" in s.skip_reason and s.metrics == first.metrics
    assert "find champion" not in again.calls  # nothing decided again
    regated = FakeSteps({"adapter": 0.2, "merged": 0.0}, cached=True)
    s = pipeline.run(_resolved(**{"gate.threshold": 0.1}), layout, regated)
    assert not s.skipped and s.from_cache and "gate adapter" in regated.calls
    forced = FakeSteps({"adapter": 0.2}, cached=True)
    assert not pipeline.run(_resolved(**{"gate.threshold": 0.5}), layout, forced, force=True).skipped and "train fresh" in forced.calls


def test_the_profile_is_resolved_once_and_recorded(tmp_path, monkeypatch):
    queries = []
    monkeypatch.setattr(profiles, "free_gpu_gib", lambda: queries.append(1) or 80.0)
    resolved = pipeline.resolve("qwen2-vl-7b-nutrition", {"model.base": "tiny:qwen2_vl", "train.max_steps": 2})
    assert len(queries) == 1 and resolved.config.train.profile == "large"
    steps = FakeSteps({"adapter": 0.0})
    s = pipeline.run(resolved, pipeline.RunLayout.at(tmp_path), steps)
    assert len(queries) == 1  # nothing downstream asks the GPU again
    assert steps.configs[0].train.profile == "large" and steps.configs[0].model.quantization == "none"
    assert json.loads((tmp_path / "config.json").read_text())["train"]["profile"] == "large" == s.profile


def test_an_unresolved_profile_never_names_a_training_folder(tmp_path):
    config = pipeline.configure("smoke")
    assert config.train.profile == "auto"
    data = DatasetRef(fingerprint="f", root=str(tmp_path), splits={}, counts={})
    with pytest.raises(ValueError, match="train.profile=auto"):
        pipeline.RunLayout.at(tmp_path).train_dir(data, config)
