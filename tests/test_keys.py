"""What retrains and what does not: the keys of vlmdet/run/keys.py, the data cache, check runs."""
from __future__ import annotations

import json

import pytest

from vlmdet.run.layout import RunLayout
from prefect import flow

import vlmdet.data
from data_fixtures import encode, noise, write_coco
from tasks.prepare_data import prepare_data
from vlmdet.config.settings import CHECK_RUN_TARGET, guard_check_run, load_preset
from vlmdet.run.keys import decision_settings, evaluation_key, stamp_revision, training_key


def test_training_settings_change_the_key_gate_and_publish_do_not():
    base = load_preset("smoke")
    key = training_key(base, "fp")
    for change in ({"train.learning_rate": 1e-4}, {"lora.r": 8}, {"model.max_pixels": 100352},
                   {"train.max_steps": 7}, {"eval.val_max_images": 3}, {"train.save_steps": 50}):
        assert training_key(base.override(change), "fp") != key, change
    assert training_key(base, "other-data") != key
    for same in ({"gate.threshold": 0.9}, {"gate.min_delta": 0.2}, {"publish.target": "hub:org/x"},
                 {"train.timeout_s": 5}, {"eval.preview_images": 1}, {"train.ddp_find_unused": True},
                 # an out-of-memory retry: the same effective batch in smaller pieces is the same run
                 {"train.per_device_batch": 2, "train.grad_accum": 2}):
        assert training_key(base.override(same), "fp") == key, same
    # gate settings alone: same evaluation, other decision settings -> the flow decides again
    gated = base.override({"gate.threshold": 0.9})
    assert evaluation_key(gated, "fp") == evaluation_key(base, "fp")
    assert decision_settings(gated) != decision_settings(base)


def test_stamp_revision_reads_only_a_hub_commit():
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert stamp_revision(f"hub:org/ds@{sha}") == sha
    assert stamp_revision(f"hub:org/ds@bbox=xyxy-abs@{sha}") == sha
    assert stamp_revision("hub:org/ds") is None and stamp_revision("coco:/x#" + "a" * 16) is None


def test_check_run_publishes_locally_unless_the_target_is_named():
    nightly = load_preset("qwen2-vl-7b-nutrition")
    assert nightly.publish.target.startswith("hub:")
    check = nightly.override({"train.max_steps": 10, "data.max_images": 64})
    guarded, note = guard_check_run(check, {"train.max_steps", "data.max_images"})
    assert guarded.publish.target == CHECK_RUN_TARGET
    assert "train.max_steps=10" in note and "data.max_images=64" in note and nightly.publish.target in note
    explicit, note = guard_check_run(check, {"train.max_steps", "publish.target"})
    assert explicit.publish.target == nightly.publish.target and note is None
    assert guard_check_run(nightly, set()) == (nightly, None)  # a full run goes where the preset says
    smoke = load_preset("smoke")  # max_steps set, but its target is a local folder already
    assert guard_check_run(smoke, set()) == (smoke, None)


@pytest.mark.usefixtures("prefect_harness")
def test_editing_one_box_or_one_image_of_a_coco_dataset_retrains(tmp_path, monkeypatch):
    images = [{"file": f"p{i}.jpg", "bytes": encode(noise((40, 30), 700 + i)), "size": (40, 30)} for i in range(6)]
    ann = write_coco(tmp_path / "src", images, [(i, [2, 2, 20, 15], "nutrition-table") for i in range(6)])
    config = load_preset("smoke", {"data.dataset": f"coco:{ann.parent}"})
    calls = []
    real = vlmdet.data.prepare  # the preparation itself, below the step's cache
    monkeypatch.setattr(vlmdet.data, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))

    @flow
    def prep():
        return prepare_data(config, RunLayout.at(tmp_path / "run"))

    first = prep()
    assert prep().fingerprint == first.fingerprint and len(calls) == 1  # unchanged: Prefect's cache, no work
    key = training_key(config, first.fingerprint)

    coco = json.loads(ann.read_text())
    coco["annotations"][3]["bbox"] = [3, 2, 20, 15]  # one box moves by one pixel
    ann.write_text(json.dumps(coco))
    moved = prep()
    assert len(calls) == 2 and moved.fingerprint != first.fingerprint
    assert training_key(config, moved.fingerprint) != key

    (ann.parent / "p4.jpg").write_bytes(encode(noise((40, 30), 999)))  # one image replaced, same size
    edited = prep()
    assert len(calls) == 3 and edited.fingerprint not in (first.fingerprint, moved.fingerprint)
    assert len({training_key(config, r.fingerprint) for r in (first, moved, edited)}) == 3
