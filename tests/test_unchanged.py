"""Nothing a user, a cache or a target can see changes when the code is reorganised (issue 27).

One small but complete run through the product's command line, `python -m vlmdet.cli retrain` in a
subprocess (module paths inside vlmdet do not matter to it), against the session's Prefect test server:
the smoke preset cut down to 24 synthetic images, 2 training steps with a checkpoint at each (so the
validation still chooses one), no base evaluation, threshold 0 and a local target inside the work
folder, so that train, evaluate, gate, merge, evaluate merged, gate merged and publish all run. What the
run leaves is compared, exactly, with tests/golden/unchanged.json:

- summary.json, without what differs from run to run by nature (seconds, timeline, its picture);
- every step's cache key: the markers beside the step outputs, the result files Prefect keys by them
  (WORKDIR/.prefect-results), the folders under data/, train/ and merged/, run_key and the decision
  settings of last_success.json;
- every published file's sha256 (the model card and vlmdet.json as text, for a readable diff), the
  resolved configuration (config.json) and the sha256 of each evaluation's predictions.

The work folder is always /tmp/vlmdet-test-unchanged/run (a lock file keeps two pytest processes apart):
the keys hash absolute paths, and the path then reads "WORKDIR" in the golden.

Some keys are made from file modification times (vlmdet.keys.path_stamp at 99a8b85): the evaluation
keys of the adapter and of the merged model, and the merge key that names merged/<id>. Those cannot
repeat from one run to the next, so the test recomputes each from the files on disk with the formula
of 99a8b85 (_keys_by_formula) and puts a placeholder in its place only where the run's value equals
it: a changed formula shows up as the raw key against the placeholder. The publication's run id is
the flow run's id (its first 12 hex digits), read back from the test server and replaced the same
way. A local target's revision hashes its files' modification times: only its shape is kept.

Floats are compared exactly: two runs on this machine gave the same losses, metrics, predictions and
weights bit for bit. The golden records the machine it was made on (`machine`: the CPU's vector
instructions as torch uses them, its model, torch and transformers): elsewhere the same code may give other
bits, so the test skips there and says so rather than fail on arithmetic. The children run with OMP_NUM_THREADS=1: with 2 threads the detections' scores
(eval predictions.json) came out different from 1 thread's, while weights, losses and metrics did not,
so the core count of the machine would otherwise show up in the golden. Another CPU (other vector
instructions) or other torch/transformers versions may still give other bits: regenerate there.

The golden was written by this test from the code before the restructuring, 99a8b85:

    git worktree add /tmp/wt-golden 99a8b85 && cp tests/test_unchanged.py /tmp/wt-golden/tests/
    cd /tmp/wt-golden && VLMDET_WRITE_GOLDEN=1 HF_HUB_OFFLINE=1 /work/main/.venv/bin/python -m pytest \\
        -p no:cacheprovider -q tests/test_unchanged.py
    cp /tmp/wt-golden/tests/golden/unchanged.json tests/golden/ && git worktree remove --force /tmp/wt-golden

The run's children import vlmdet from the checkout this file is in (PYTHONPATH; the test checks it),
never the one the virtual environment has installed. Regenerate only for a change in behaviour that
is meant, and say so in the commit.
"""
from __future__ import annotations

import difflib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "unchanged.json"
# Fixed, not tmp_path nor $TMPDIR: the keys hash the work folder's absolute path.
BASE = Path("/tmp/vlmdet-test-unchanged")
WORKDIR = BASE / "run"
LOCK = Path("/tmp/vlmdet-test-unchanged.lock")  # outside BASE: it outlives the folder's removal
# logging_steps 1: a loss at each step (summary, card, loss curve); save_steps 1: two checkpoints to choose from
SETTINGS = {"data.dataset": "synth:24", "train.max_steps": "2", "train.save_steps": "1", "train.logging_steps": "1",
            "train.per_device_batch": "2", "eval.eval_base": "false", "eval.preview_images": "2",
            "publish.target": "local:published"}
# Published files kept as lines (after _normalize), so a difference reads as the line that changed. The run
# id (the flow run's) is the only thing in them that varies from run to run; paths never reach them.
TEXT_FILES = ("README.md", "vlmdet.json")
# The eval settings vlmdet.keys left out of an evaluation key at 99a8b85 (role "execution" in vlmdet/config.py).
EVAL_EXECUTION_ONLY = ("timeout_s", "num_processes")
CONTENT_REVISION = re.compile(r"content-[0-9a-f]{16}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the keys made from modification times, by the formulas of 99a8b85 (vlmdet/keys.py and layout.py there) ---
def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _path_stamp(folder: str) -> str:
    """keys.path_stamp: the folder's files' names, sizes and modification times."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and ".cache" not in p.parts)
    return f"{Path(folder).resolve()}#{_hash([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])}"


def _keys_by_formula(summary: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    """{key as the formula gives it from the files on disk: its placeholder}."""
    fingerprint = summary["dataset"]["fingerprint"]
    ev = {k: v for k, v in config["eval"].items() if k not in EVAL_EXECUTION_ONLY}
    out = {}
    for name, model in (("adapter", summary["adapter"]), ("merged", summary["merged"])):
        key = _hash({"out": str(WORKDIR / "eval" / name), "model": _path_stamp(model), "data": fingerprint, "eval": ev,
                     "model_settings": config["model"], "category": config["data"]["category"]})
        out[key] = f"<{name} evaluation key: 99a8b85 formula>"
    merge_id = _hash({"out": str(WORKDIR / "merged"), "adapter": _path_stamp(summary["adapter"]), "data": fingerprint,
                      "model_settings": config["model"], "split": config["eval"]["split"]})
    out[merge_id] = "<merge key: 99a8b85 formula>"
    return out


def _flow_run_id() -> str:
    """The publication's run id under Prefect: the first 12 hex digits of the run's flow-run id."""
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=50)
                if r.parameters.get("workdir") == str(WORKDIR)]
    return runs[0].id.hex[:12]


# --- capture ---------------------------------------------------------------------------------------------
def _normalize(obj: Any, ids: dict[str, str]) -> Any:
    if isinstance(obj, dict):
        return {k: _normalize(v, ids) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normalize(v, ids) for v in obj]
    if not isinstance(obj, str):
        return obj
    # the checkout's path, wherever it reaches a captured file: the golden comes from a worktree elsewhere
    obj = obj.replace(str(WORKDIR), "WORKDIR").replace(str(ROOT), "REPO")
    for raw, placeholder in ids.items():
        obj = obj.replace(raw, placeholder)
    return CONTENT_REVISION.sub("content-<16 hex: the published files' modification times>", obj)


def _names(folder: Path, ids: dict[str, str]) -> list[str]:
    """The names in `folder`, in the order of their placeholders (a raw key sorts by chance)."""
    return sorted(_normalize([p.name for p in folder.iterdir()], ids))


def _capture() -> dict[str, Any]:
    summary = json.loads((WORKDIR / "summary.json").read_text())
    config = json.loads((WORKDIR / "config.json").read_text())
    ids = {**_keys_by_formula(summary, config), _flow_run_id(): "<run id: the flow run's>"}
    for name in ("seconds", "timeline", "timeline_picture"):  # wall-clock time and its picture
        summary.pop(name)
    last = json.loads((WORKDIR / "last_success.json").read_text())  # its `finished` is a clock time
    published = WORKDIR / "published"
    files = {}
    for path in sorted(p for p in published.rglob("*") if p.is_file()):
        name = path.relative_to(published).as_posix()
        files[name] = path.read_text().splitlines() if name in TEXT_FILES else _sha256(path)
    return _normalize({
        "summary": summary,
        "config": config,
        "keys": {
            "markers": {p.relative_to(WORKDIR).as_posix(): p.read_text()
                        for p in sorted(WORKDIR.rglob(".vlmdet-step-key"))},
            "prefect_results": _names(WORKDIR / ".prefect-results", ids),
            "folders": {d: _names(WORKDIR / d, ids) for d in ("data", "train", "merged")},
            "run_key": summary["run_key"],
            "last_success": {"run_key": last["run_key"], "decision_settings": last["decision_settings"]},
        },
        "published": files,
        "predictions": {d.name: _sha256(d / "predictions.json") for d in sorted((WORKDIR / "eval").iterdir())},
    }, ids)


def _machine() -> dict[str, str]:
    """What decides the floats' last bits besides the code: the vector instructions torch's CPU kernels use,
    the CPU, and the two libraries that compute."""
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "") if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu,
            "torch": torch.__version__, "transformers": transformers.__version__}


# --- comparison ------------------------------------------------------------------------------------------
def _differences(want: Any, got: Any, path: str = "") -> list[str]:
    """One line per differing leaf, named by its path (a unified diff where a file's lines were added or removed)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(want) | set(got), key=str):
            p = f"{path}/{k}"
            if k not in got:
                out.append(f"{p}: in the golden only ({_short(want[k])})")
            elif k not in want:
                out.append(f"{p}: in this run only ({_short(got[k])})")
            else:
                out += _differences(want[k], got[k], p)
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in _differences(a, b, f"{path}[{i}]")]
    if want == got:
        return []
    if isinstance(want, list) and isinstance(got, list) and all(isinstance(x, str) for x in want + got):
        diff = difflib.unified_diff(want, got, "golden", "this run", lineterm="", n=1)  # a file's lines
        return [f"{path}:\n    " + "\n    ".join(list(diff)[:40])]
    return [f"{path}: golden {_short(want)}, this run {_short(got)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


# --- the run -----------------------------------------------------------------------------------------------
def _child_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),  # the session's test server
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def run_folder(prefect_harness):
    """The fixed work folder, held against other pytest processes while the run and its reading last."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        shutil.rmtree(BASE, ignore_errors=True)
        WORKDIR.mkdir(parents=True)
        yield WORKDIR
    finally:
        os.close(fd)


def test_a_run_leaves_what_the_code_before_the_restructuring_left(run_folder):
    env = _child_env()
    where = subprocess.run([sys.executable, "-c", "import vlmdet; print(vlmdet.__file__)"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()) == ROOT / "vlmdet" / "__init__.py", where.stdout + where.stderr

    flags = [a for key, value in SETTINGS.items() for a in (f"--{key}", value)]
    proc = subprocess.run([sys.executable, "-m", "vlmdet.cli", "retrain", "--preset", "smoke", "--workdir",
                           str(run_folder), "--threshold", "0", *flags],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    got = _capture()
    got["machine"] = _machine()

    if os.environ.get("VLMDET_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN} from the code at {ROOT}; nothing compared")
    golden = json.loads(GOLDEN.read_text())
    if golden.get("machine") != got["machine"]:
        pytest.skip(f"the golden's floats are bit-exact for {golden.get('machine')}; this is {got['machine']}: "
                    "regenerate it here at 99a8b85 (this module's docstring) to compare")
    differences = _differences(golden, got)
    if differences:
        pytest.fail(f"{len(differences)} differences from {GOLDEN.name} (the code before the restructuring):\n"
                    + "\n".join(differences[:60]), pytrace=False)
