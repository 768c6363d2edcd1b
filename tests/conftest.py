"""Shared fixtures. Append yours; keep them cheap unless session-scoped."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for the whole session: starting one costs seconds."""
    from prefect.testing.utilities import prefect_test_harness

    # 120 s, not Prefect's 30: a busy 2-core machine (CI, parallel work) can take longer to start it
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry errors
    with prefect_test_harness(server_startup_timeout=120):
        yield


# --- models and data shared by the pipeline tests (lead) ---
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests reaches a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random micro Qwen2-VL folder (model + processor), built once per session."""
    from vlmdet.modeling.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2_vl-micro", size="micro",
                                min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28))


@pytest.fixture(scope="session")
def synth_coco(tmp_path_factory):
    """12 synthetic images as one COCO file, for steps that take a split directly."""
    from vlmdet.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth") / "data", 12, seed=3)


@pytest.fixture
def micro_config(tiny_model):
    """The smoke preset shrunk to the micro model and a handful of steps."""
    from vlmdet.config.settings import load_preset

    return load_preset("smoke", {"model.base": tiny_model, "train.max_steps": 2, "train.per_device_batch": 2,
                                 "train.save_steps": 1, "train.logging_steps": 1, "eval.batch_size": 6, "eval.max_new_tokens": 12,
                                 "eval.eval_base": False, "eval.preview_images": 2})
