"""Only safe weights (issue 12): every load sets trust_remote_code=False and use_safetensors=True,
and a folder or repository whose weights exist only as pickles is refused, saying why, before
anything is unpickled.

transformers 5 writes safetensors even with save_pretrained(safe_serialization=False), so the
pickle-only folders here are written as older tools wrote them: torch.save of the state dict to
pytorch_model.bin / adapter_model.bin.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmdet.config.settings import RunConfig
from vlmdet.modeling import load as loadmod
from vlmdet.modeling.load import ModelError, check_model_source, family_of, load_for_inference, saved_pixel_budget


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model) -> Path:
    """A LoRA adapter (safetensors, as PEFT writes it) over the session's tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_model).save_pretrained(out)
    return out


def _pickle_only(src: Path, dst: Path, weights: str, pickle_name: str) -> Path:
    shutil.copytree(src, dst)
    torch.save(load_file(dst / weights), dst / pickle_name)
    (dst / weights).unlink()
    return dst


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything calls torch.load (what reading a .bin checkpoint does)."""
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load was called"))
    return calls


def test_a_model_folder_holding_only_a_bin_is_refused_with_the_reason(tiny_model, tmp_path, no_unpickling):
    folder = _pickle_only(Path(tiny_model), tmp_path / "bin-only", "model.safetensors", "pytorch_model.bin")
    for load in (lambda: loadmod.load_model(str(folder), RunConfig().model), lambda: check_model_source(str(folder))):
        with pytest.raises(ModelError) as err:
            load()
        msg = str(err.value)
        assert str(folder) in msg and "pytorch_model.bin" in msg
        assert "pickle" in msg and "arbitrary code" in msg and "safetensors" in msg


def test_an_adapter_holding_only_adapter_model_bin_is_refused(adapter_dir, tmp_path, no_unpickling):
    folder = _pickle_only(adapter_dir, tmp_path / "adapter-bin", "adapter_model.safetensors", "adapter_model.bin")
    with pytest.raises(ModelError, match="adapter_model.bin.*pickle.*arbitrary code"):
        load_for_inference(str(folder), RunConfig().model)
    from vlmdet.publishing.merge import merge

    with pytest.raises(ModelError, match="adapter_model.bin"):
        merge(str(folder), RunConfig(), tmp_path / "merged", images=[])


def test_trainers_own_pickles_beside_safetensors_weights_are_not_a_reason_to_refuse(tiny_model, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_model, folder)
    torch.save({}, folder / "training_args.bin")
    assert check_model_source(str(folder)) == str(folder.resolve())


def test_every_load_passes_no_remote_code_and_safetensors_only(adapter_dir, tiny_model, monkeypatch):
    import peft
    import transformers

    seen: list[tuple[str, dict]] = []

    def spy(cls_name: str, cls):
        real = cls.from_pretrained.__func__

        def from_pretrained(klass, *args, **kwargs):
            seen.append((cls_name, kwargs))
            return real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))

    for name in ("AutoModelForImageTextToText", "AutoProcessor", "AutoConfig", "AutoImageProcessor"):
        spy(name, getattr(transformers, name))
    peft_seen = []
    real_peft = peft.PeftModel.from_pretrained.__func__
    monkeypatch.setattr(peft.PeftModel, "from_pretrained",
                        classmethod(lambda k, *a, **kw: peft_seen.append(a[1]) or real_peft(k, *a, **kw)))

    cfg = RunConfig().model
    load_for_inference(str(adapter_dir), cfg)  # base model + adapter + processor
    load_for_inference(tiny_model, cfg)  # a merged folder
    family_of(str(adapter_dir))
    saved_pixel_budget(tiny_model)
    names = {n for n, _ in seen}
    assert names == {"AutoModelForImageTextToText", "AutoProcessor", "AutoConfig", "AutoImageProcessor"}
    for name, kwargs in seen:
        assert kwargs.get("trust_remote_code") is False, (name, kwargs)
        if name == "AutoModelForImageTextToText":
            assert kwargs.get("use_safetensors") is True, kwargs
    assert peft_seen == [str(adapter_dir)]  # PEFT has no use_safetensors: check_safe_weights ran before it


def test_predict_on_a_pickle_only_model_is_one_line_and_exit_4(tiny_model, tmp_path):
    folder = _pickle_only(Path(tiny_model), tmp_path / "bin-only", "model.safetensors", "pytorch_model.bin")
    out = subprocess.run([sys.executable, "-m", "vlmdet.cli", "predict", "--model", str(folder), "--out",
                          str(tmp_path / "o"), str(tmp_path / "x.jpg")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 4, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = [l for l in out.stderr.splitlines() if l.startswith("vlmdet: error:")]
    assert "pytorch_model.bin" in line and "safetensors only" in line


# --- Hub repositories, through the local Hub-API server of tests/hub_server.py ---

@pytest.fixture
def online_hub(monkeypatch):
    import huggingface_hub.constants as C
    import huggingface_hub.utils._detect_agent as detect_agent

    from hub_server import HubServer

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1; this server is local
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(detect_agent, "_registry", detect_agent._EMPTY_REGISTRY)
    with HubServer(tokens={"hf_t"}) as srv:
        monkeypatch.setattr(C, "ENDPOINT", srv.url)
        yield srv


def _upload(hub, folder: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token="hf_t")
    api.create_repo(repo, private=False)
    api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="weights")


def test_a_hub_repo_holding_only_a_bin_is_refused(online_hub, tiny_model, tmp_path):
    _upload(online_hub, _pickle_only(Path(tiny_model), tmp_path / "b", "model.safetensors", "pytorch_model.bin"),
            "acme/bin-only")
    _upload(online_hub, Path(tiny_model), "acme/safe")
    with pytest.raises(ModelError, match="acme/bin-only: refusing pytorch_model.bin.*pickle"):
        check_model_source("acme/bin-only")
    assert check_model_source("acme/safe") == "acme/safe"


def test_a_missing_model_says_no_such_folder_or_repository(online_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"runs/nope: no such folder or repository .*no repository runs/nope"):
        check_model_source("runs/nope")
    import huggingface_hub.constants as C

    import huggingface_hub.utils._http as http

    monkeypatch.setattr(C, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    # the client's own backoff sleeps 1-8 s between its 5 tries: instant here
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = lambda s: None
    monkeypatch.setattr(http, "time", fake_time)
    with pytest.raises(ModelError, match=r"no such folder or repository .*could not be reached"):
        check_model_source("runs/nope")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"no such folder or repository .*HF_HUB_OFFLINE=1"):
        check_model_source("runs/nope")
    with pytest.raises(ModelError, match="not a saved model or adapter folder"):
        check_model_source(str(tmp_path))


def test_the_pretrain_script_refuses_a_pickle_only_base(tiny_model, tmp_path, no_unpickling):
    """scripts/pretrain_tiny_base.py loads its --init / --base as the package loads every model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_tiny_base",
                                                  Path(__file__).resolve().parents[1] / "scripts" / "pretrain_tiny_base.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = _pickle_only(Path(tiny_model), tmp_path / "bin-only", "model.safetensors", "pytorch_model.bin")
    threads = torch.get_num_threads()  # `check` sets the process's thread count
    for argv in (["check", "--base", str(folder), "--threads", str(threads)],
                 ["train", "--out", str(tmp_path / "out"), "--init", str(folder), "--workers", "0"]):
        with pytest.raises(ModelError, match=r"refusing pytorch_model\.bin"):
            script.main(argv)
    from transformers import AutoModelForImageTextToText

    model = script.load_base(AutoModelForImageTextToText, tiny_model)  # a safetensors base loads
    want = load_file(Path(tiny_model) / "model.safetensors")
    name = next(k for k in want if k.endswith("lm_head.weight") or k.endswith("embed_tokens.weight"))
    assert torch.equal(model.state_dict()[name], want[name])
