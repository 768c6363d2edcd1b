"""requirements/lock.txt is what CI, scripts/setup.sh and the GPU image install: every requirement of
pyproject.toml is in it at one exact version with hashes, and every installer uses it the same way
(hash-checked, nothing pulled in from outside it). A dependency added to pyproject.toml without
`bash scripts/lock.sh` fails here, not as a surprise version at 2 a.m."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def _locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes), read the way pip reads the file (continuation lines joined)."""
    text = LOCK.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        spec, *_ = line.split("--hash", 1)
        name, _, version = spec.strip().partition("==")
        assert version and re.fullmatch(r"[\w.+!-]+", version.strip()), f"not an exact pin: {line[:80]}"
        out[canonicalize_name(name)] = (version.strip(), re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
    return out


def test_every_requirement_of_pyproject_is_locked_exactly_with_hashes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = _locked()
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    env = {"python_version": "3.11", "platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64"}
    for req in wanted:
        if req.marker and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} is in pyproject.toml but not in requirements/lock.txt: run bash scripts/lock.sh"
        version, hashes = locked[name]
        assert req.specifier.contains(version, prereleases=True), f"lock has {name}=={version}, pyproject wants {req}"
    assert all(hashes for _, hashes in locked.values()), [n for n, (_, h) in locked.items() if not h]


def test_torch_is_locked_at_the_pinned_pair():
    locked = _locked()
    pins = dict(line.split("==") for line in (ROOT / "requirements" / "constraints.in").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {name: locked[name][0] for name in pins} == pins


def test_every_installer_installs_the_lock_hash_checked_and_nothing_else():
    dockerfile = (ROOT / "deployments" / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for name, text in (("Dockerfile", dockerfile), ("setup.sh", setup)):
        assert "--require-hashes --no-deps -r requirements/lock.txt" in text.replace('"$LOCK"', "requirements/lock.txt"), name
        assert re.search(r"pip install[^\n]*--no-deps[^\n]*--no-build-isolation", text), f"{name}: vlmdet itself"
    assert "bash scripts/setup.sh" in ci
    # The image's last USER is not root.
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
