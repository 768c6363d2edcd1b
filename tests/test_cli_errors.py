"""A user error is one line on stderr naming the input and the fix, a documented exit code, and no
traceback unless -v (issue 13, item 2). One test per kind of error; the codes are README's."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import flows.retrain  # noqa: F401 - Prefect binds its console handler to sys.stderr at import: do it outside capsys
from vlmdet import cli
from vlmdet.cli import EXIT_CONFIG, EXIT_DATA, EXIT_HUB, EXIT_MODEL, main


def assert_one_error(capsys_or_text, code: int, got: int, *needles: str) -> str:
    err = capsys_or_text if isinstance(capsys_or_text, str) else capsys_or_text.readouterr().err
    assert got == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("vlmdet: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_unknown_preset(capsys):
    assert_one_error(capsys, EXIT_CONFIG, main(["retrain", "--preset", "no-such-preset"]),
               "preset 'no-such-preset' not found", "choose one of", "smoke")


def test_unknown_setting(capsys):
    assert_one_error(capsys, EXIT_CONFIG, main(["retrain", "--set", "train.max_step=3"]),
               "train.max_step", "unknown setting")


def test_bad_value(capsys):
    assert_one_error(capsys, EXIT_CONFIG, main(["retrain", "--train.max_steps", "ten"]),
               "train.max_steps='ten' is not a valid int")


def test_a_setting_the_command_does_not_read(capsys, tmp_path):
    assert_one_error(capsys, EXIT_CONFIG, main(["predict", "--model", str(tmp_path), "--out", str(tmp_path / "o"),
                                          "--set", "train.max_steps=3", "x.jpg"]),
               "train.max_steps", "`vlmdet predict` does not use this setting", "eval.batch_size")


@pytest.mark.parametrize("spec,needles", [
    ("nonsense", ["'nonsense' is not a dataset spec", "synth:N, coco:PATH"]),
    ("synth:0", ["synth takes a positive image count"]),
    ("coco:data/missing", ["data/missing does not exist", "annotations.json"]),
])
def test_bad_dataset_spec_or_missing_path_fails_before_prefect_starts(capsys, spec, needles, monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "flows.retrain", raising=False)
    assert_one_error(capsys, EXIT_DATA, main(["retrain", "--workdir", "unused", "--dataset", spec]), *needles)
    assert "flows.retrain" not in sys.modules  # the flow (and its Prefect server) never started


def test_missing_model(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_error(capsys, EXIT_MODEL, main(["predict", "--model", "runs/nope", "--out", "o", "x.jpg"]),
               "--model runs/nope: no such folder or repository", "HF_HUB_OFFLINE=1")
    assert_one_error(capsys, EXIT_MODEL, main(["retrain", "--model.base", "runs/nobase"]),
               "model.base runs/nobase: no such folder or repository")


def test_missing_image_is_a_line_not_a_traceback(capsys, tiny_model, tmp_path):
    code = main(["predict", "--model", tiny_model, "--out", str(tmp_path / "o"), "--eval.max_new_tokens", "2",
                 str(tmp_path / "nope.jpg")])
    captured = capsys.readouterr()
    assert code == cli.EXIT_SOME_INPUTS_FAILED and "Traceback" not in captured.err + captured.out
    assert f"{tmp_path / 'nope.jpg'}: FAILED missing-file: no such file" in captured.out
    assert "0 of 1 images read, 1 failed" in captured.out


@pytest.fixture
def hub_records(tmp_path, tiny_model):
    from pubkit import records

    return records(tmp_path, Path(tiny_model))


def _retrain_that_publishes(monkeypatch, hub_records, endpoint: str, token: str | None):
    """The retrain command up to its publish step, for real against `endpoint` (training is not the point)."""
    import flows.retrain
    from vlmdet import publishing
    from vlmdet.config.settings import RunConfig

    def retrain(workdir, **_):
        config = RunConfig(name="smoke").override({"publish.target": "hub:acme/detector", "publish.endpoint": endpoint})
        publishing.publish(*hub_records, config, workdir, token, sleep=lambda s: None)

    monkeypatch.setattr(flows.retrain, "retrain", retrain)


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants as C
    import huggingface_hub.utils._detect_agent as detect_agent

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(detect_agent, "_registry", detect_agent._EMPTY_REGISTRY)


def test_missing_token(capsys, monkeypatch, hub_records, online, tmp_path):
    from hub_server import HubServer

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer(tokens={"hf_only_this"}) as hub:
        _retrain_that_publishes(monkeypatch, hub_records, hub.url, token=None)
        assert_one_error(capsys, EXIT_HUB, main(["retrain", "--workdir", str(tmp_path)]),
                   "HTTP 401", "token is missing", "HF_TOKEN")


def test_unreachable_hub(capsys, monkeypatch, hub_records, online, tmp_path):
    import huggingface_hub.utils._http as http
    import time
    import types

    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = lambda s: None  # the client's own backoff between its tries
    monkeypatch.setattr(http, "time", fake_time)
    _retrain_that_publishes(monkeypatch, hub_records, "http://127.0.0.1:9", token="hf_x")
    assert_one_error(capsys, EXIT_HUB, main(["retrain", "--workdir", str(tmp_path)]),
               "hub:acme/detector", "connection to the Hub dropped")


def test_verbose_shows_the_traceback(capsys):
    assert main(["-v", "retrain", "--preset", "no-such-preset"]) == EXIT_CONFIG
    assert "Traceback" in capsys.readouterr().err


def test_a_data_error_inside_the_flow_is_one_line_too(prefect_harness, tmp_path, capfd):
    """prepare_data raises DataError inside the Prefect flow: Prefect's task and flow failure logs
    (two tracebacks, the sentence three times) stay off the console; the UI still gets them."""
    from data_fixtures import write_coco

    ann = write_coco(tmp_path / "ds", [{"file": f"gone{i}.jpg", "bytes": None, "size": (40, 30)} for i in range(3)], [])
    code = main(["retrain", "--workdir", str(tmp_path / "run"), "--dataset", f"coco:{ann}"])
    err = capfd.readouterr().err
    line = assert_one_error(err, EXIT_DATA, code, "no usable images", "missing-file 3", "report.json")
    assert len(re.findall("no usable images", err)) == 1, err
    assert len(err.splitlines()) <= 6, err  # the server start/stop lines, the flow's first line, the error
    assert json.loads(Path(ann).read_text())  # the input is untouched
    assert line
