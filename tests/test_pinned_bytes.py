"""The bytes gated are the bytes published (issue 26, item 3).

Two runs share one workdir (a manual run next to the scheduled one): the second merges another adapter
between the first's gate and its publish. The first still publishes the bytes its evaluation of the
merged model judged, never the second's. Merged folders no running run holds are removed, a finished
merge is reused, and bytes that changed after the merge (in the folder, or while being copied or sent)
are refused naming the folder and both hashes.

The merge runs in this process (runsteps' child started in-process): what is under test is the
parent's side, the folders, holds, hashes and checks; a child would import torch again for each merge.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlmdet.pipeline.steps
from pubkit import NO_SLEEP, online_classic_lfs, records
from vlmdet.pipeline import run as pipeline
from vlmdet import publishing
from vlmdet.config.settings import RunConfig
from vlmdet.run.layout import RunLayout
from vlmdet.publishing import PermanentPublishError
from vlmdet.run.records import AdapterRef, DatasetRef, EvalReport
from vlmdet.pipeline.step import Plain
from vlmdet.pipeline.child import STEPS


def _adapter(base: str, out: Path, seed: int) -> AdapterRef:
    """A LoRA adapter with random B matrices (a fresh one is B = 0: every seed would merge to the base)."""
    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForImageTextToText.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.2)
    peft.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return AdapterRef(path=str(out), base_model=base, family="qwen2_vl", global_step=1)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [_adapter(tiny_model, root / f"a{seed}", seed) for seed in (1, 2, 3)]


@pytest.fixture
def merges(monkeypatch) -> list[str]:
    """Each merge the runs start (its output folder), run in this process through the same JSON round trip."""
    made: list[str] = []

    def run_step(step, request, step_dir, **kwargs):
        assert step == "merge"
        made.append(request["out"])
        return json.loads(json.dumps(STEPS[step](json.loads(json.dumps(request, default=str)))))

    monkeypatch.setattr(vlmdet.pipeline.steps, "run_step", run_step)
    return made


def _resolved(tiny_model):
    return pipeline.resolve("smoke", {"model.base": tiny_model, "eval.eval_base": False, "eval.preview_images": 0,
                                      "eval.max_new_tokens": 12, "gate.threshold": 0.5,
                                      "publish.target": "local:published"}, free_gib=None)


def _bytes(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sha256(files: dict[str, bytes]) -> str:
    """The content hash as documented for operators: `sha256sum` of each file, sorted by name, hashed."""
    lines = "".join(f"{hashlib.sha256(files[n]).hexdigest()}  {n}\n" for n in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


class Run(Plain):
    """One run: its adapter is `adapter` (training and evaluation stand-ins: the merged model scores
    `merged_map50`); merge, gate and publish are the product's. `judged` keeps the bytes of the merged
    folder its evaluation was given; `before_publish` runs between its gate and its publish."""

    def __init__(self, adapter: AdapterRef, data: DatasetRef, merged_map50: float, before_publish=None):
        self.adapter, self.data, self.merged_map50, self.before_publish = adapter, data, merged_map50, before_publish
        self.judged: dict[str, bytes] = {}

    def __call__(self, step, *args, **kwargs):
        a = step.arguments(*args, **kwargs)
        if step.name == "prepare_data":
            return self.data, False
        if step.name == "train":
            return self.adapter, False
        if step.name == "evaluate":
            return self.evaluate(a["model"], a["dataset"], a["layout"], a["name"]), False
        if step.name == "publish" and self.before_publish:
            self.before_publish()
        return super().__call__(step, *args, **kwargs)

    def evaluate(self, model, dataset, layout, name="adapter"):
        value = 0.8
        if name == "merged":
            self.judged = _bytes(model)
            value = self.merged_map50
        return EvalReport(map=value, map50=value, map75=value, split="test", num_images=2, parse_failures=0,
                          predictions=str(layout.eval_dir(name) / "predictions.json"), model=model,
                          data_fingerprint=dataset.fingerprint)


def _data(synth_coco) -> DatasetRef:
    return DatasetRef(fingerprint="fp-pinned", root=str(Path(synth_coco).parent), splits={"test": str(synth_coco)},
                      counts={"test": {"images": 12}})


def test_a_second_run_merging_between_gate_and_publish_does_not_change_what_the_first_publishes(
        tiny_model, synth_coco, adapters, merges, tmp_path):
    resolved, data = _resolved(tiny_model), _data(synth_coco)
    second = Run(adapters[1], data, merged_map50=0.3)  # merges, measures, its gate closes: publishes nothing
    first = Run(adapters[0], data, merged_map50=0.8,
                before_publish=lambda: pipeline.run(resolved, RunLayout.at(tmp_path, "second"), second))
    summary = pipeline.run(resolved, RunLayout.at(tmp_path, "first"), first)

    assert len(merges) == 2 and second.judged and first.judged != second.judged  # two adapters, two merges
    published = _bytes(tmp_path / "published")
    assert {n: published[n] for n in first.judged} == first.judged  # the first run's bytes, as its evaluation saw them
    assert published["model.safetensors"] != second.judged["model.safetensors"]
    # where the gate's record and the published model say which bytes they are
    merged = json.loads((tmp_path / "published" / "vlmdet.json").read_text())["merged"]
    assert merged["files"] == {n: hashlib.sha256(b).hexdigest() for n, b in first.judged.items()}
    assert summary.published["sha256"] == merged["sha256"] == _sha256(first.judged)
    # each run merged into a folder of its own; the first's was held (not removed) while the second merged
    assert sorted(Path(m).name for m in merges) == sorted(p.name for p in (tmp_path / "merged").iterdir() if p.is_dir())
    assert Path(summary.merged).parent == tmp_path / "merged" and summary.merged == merges[0]


def test_a_merge_removes_the_merges_no_running_run_holds_and_reuses_a_finished_one(
        tiny_model, synth_coco, adapters, merges, tmp_path):
    resolved, data = _resolved(tiny_model), _data(synth_coco)
    layout = RunLayout.at(tmp_path)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model.safetensors").write_bytes(b"x" * 10)  # the one-folder layout's leftover
    config = resolved.config
    one = vlmdet.pipeline.steps.merge(adapters[0], data, config, layout)
    with layout.holding(Path(one.path)):  # a run between its merge and its publish
        two = vlmdet.pipeline.steps.merge(adapters[1], data, config, layout)
        assert sorted(p.name for p in (tmp_path / "merged").iterdir() if p.is_dir()) == sorted(
            [Path(one.path).name, Path(two.path).name])
    three = vlmdet.pipeline.steps.merge(adapters[2], data, config, layout)  # nobody holds one or two now
    name = Path(three.path).name
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [name, f"{name}.json", f"{name}.lock"]
    assert len(merges) == 3
    # the same adapter again: found complete and reused, not merged (nor rewritten) again
    assert layout.merge_done(adapters[2], data, config)
    assert vlmdet.pipeline.steps.merge(adapters[2], data, config, layout) == three and len(merges) == 3


def test_one_byte_changed_after_the_merge_is_refused_with_both_hashes(tiny_model, synth_coco, adapters, merges,
                                                                      tmp_path):
    resolved, data = _resolved(tiny_model), _data(synth_coco)
    merged = vlmdet.pipeline.steps.merge(adapters[0], data, resolved.config, RunLayout.at(tmp_path))
    before = _bytes(merged.path)
    weights = Path(merged.path) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 1
    weights.write_bytes(bytes(raw))
    _, report, dataset, adapter, decision = records(tmp_path, Path(merged.path))
    with pytest.raises(PermanentPublishError) as err:
        publishing.publish(merged, report, dataset, adapter, decision, resolved.config, tmp_path)
    message = str(err.value)
    for text in (merged.path, _sha256(before), _sha256(_bytes(merged.path)), "changed: model.safetensors",
                 "another run on the same workdir"):
        assert text in message
    assert not (tmp_path / "published").exists() and not list(tmp_path.glob(".published.*"))


def test_merged_bytes_changed_under_their_evaluation_stop_the_run_before_the_gate(tiny_model, synth_coco, adapters,
                                                                                  merges, tmp_path):
    class Changed(Run):
        def evaluate(self, model, dataset, layout, name="adapter"):
            report = super().evaluate(model, dataset, layout, name)
            if name == "merged":  # another writer, while the evaluation read the folder
                (Path(model) / "config.json").write_text("{}")
            return report

    run = Changed(adapters[0], _data(synth_coco), merged_map50=0.8)
    with pytest.raises(PermanentPublishError, match="not gating it: .*changed: config.json"):
        pipeline.run(_resolved(tiny_model), RunLayout.at(tmp_path), run)
    assert run.judged and not (tmp_path / "published").exists()


def test_bytes_changed_while_staged_are_refused_before_the_swap(tmp_path, monkeypatch):
    """The check reads the staged copy, the bytes renamed into place, not the source before the copy."""
    from vlmdet.modeling.tiny import build_tiny_model
    import vlmdet.publishing.local as local

    rec = records(tmp_path, build_tiny_model(tmp_path / "merged" / "m", size="micro"))
    pinned = _sha256(_bytes(rec[0].path))
    config = RunConfig(name="smoke")
    first = publishing.publish(*rec, config, tmp_path)  # a champion in place
    copy2 = local.shutil.copy2

    def copy_then_flip(src, dst, **kw):
        out = copy2(src, dst, **kw)
        if Path(dst).name == "model.safetensors":  # the source is fine; its copy is not
            with open(dst, "r+b") as f:
                f.seek(100)
                byte = f.read(1)
                f.seek(100)
                f.write(bytes([byte[0] ^ 1]))
        return out

    monkeypatch.setattr(local.shutil, "copy2", copy_then_flip)
    merged, report, dataset, adapter, decision = rec
    decision.champion_revision, report.map50 = first.revision, 0.9
    with pytest.raises(PermanentPublishError, match=pinned):
        publishing.publish(merged, report, dataset, adapter, decision, config, tmp_path)
    assert (tmp_path / "published" / "vlmdet.json").read_text().count(first.run_id)  # the champion stays
    assert not list(tmp_path.glob(".published.*"))  # no staged copy left behind


def test_a_hub_commit_carries_only_the_pinned_bytes(tmp_path, monkeypatch):
    """The Hub target checks the sha256 each file of the commit carries, right before the commit."""
    from hub_server import HubServer
    from vlmdet.modeling.tiny import build_tiny_model

    online_classic_lfs(monkeypatch)
    merged, *rest = rec = records(tmp_path, build_tiny_model(tmp_path / "merged" / "m", size="micro"))
    pinned = _sha256(_bytes(merged.path))
    real_plan = publishing.plan

    def plan_then_change(*args, **kwargs):  # the folder changes after the file list is built
        files = real_plan(*args, **kwargs)
        (Path(merged.path) / "config.json").write_text("{}")
        return files

    monkeypatch.setattr(publishing, "plan", plan_then_change)
    with HubServer(tokens={"hf_t"}) as hub:
        config = RunConfig(name="smoke").override({"publish.target": "hub:acme/pinned", "publish.endpoint": hub.url})
        with pytest.raises(PermanentPublishError, match=f"{pinned}.*changed: config.json"):
            publishing.publish(*rec, config, tmp_path, "hf_t", sleep=NO_SLEEP)
        assert not hub.state.commits_matching("acme/pinned", "vlmdet-run") and not hub.state.lfs  # nothing sent
