"""README.md's tables say what the code does (issue 13, item 6): the presets table against the
preset YAMLs, the exit codes against vlmdet/cli.py, and no hand-counted test total to go stale."""
from __future__ import annotations

import re
from pathlib import Path

from vlmdet import cli
from vlmdet.config.settings import list_presets, load_preset

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _table_after(heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table after `heading`, header and rule left out."""
    rest = README[README.index(heading):]
    lines = []
    for line in rest.splitlines()[1:]:
        if line.startswith("|"):
            lines.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif lines:
            break
    return lines[2:]


def _code(cell: str) -> str:
    return re.search(r"`([^`]+)`", cell).group(1)


def test_the_presets_table_matches_the_preset_files():
    rows = {_code(r[0]): r for r in _table_after("### Settings and presets")}
    assert sorted(rows) == list_presets()  # one row per shipped preset, no more, no less
    for name, (_, base, data, notes) in rows.items():
        preset = load_preset(name)
        assert _code(base) == preset.model.base, name
        assert _code(data) == preset.data.dataset, name
    checked = 0
    for name, row in rows.items():  # the recipes spelled out in the notes column
        claimed = re.search(r"r=(\d+)/alpha (\d+).*batch (\d+) x (\d+), lr ([0-9.e-]+) (\w+), (\d+) epochs", row[3])
        if not claimed:
            continue
        p, claimed = load_preset(name), claimed.groups()
        assert (int(claimed[0]), int(claimed[1])) == (p.lora.r, p.lora.alpha), name
        assert (int(claimed[2]), int(claimed[3])) == (p.train.per_device_batch, p.train.grad_accum), name
        assert float(claimed[4]) == p.train.learning_rate and claimed[5] == p.train.scheduler, name
        assert int(claimed[6]) == p.train.epochs, name
        assert ("nf4" in row[3]) == (p.model.quantization == "nf4"), name
        assert ("vision tower bf16" in row[3]) == (p.model.quantization == "nf4" and not p.model.quantize_vision), name
        if "on q/k/v/o" in row[3]:
            assert p.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"], name
        if "all 7 linears" in row[3]:
            assert len(p.lora.target_modules) == 7, name
        checked += 1
    assert checked >= 2  # the nightly default and the seed recipe


def test_the_exit_codes_table_matches_the_cli():
    rows = _table_after("### Exit codes")
    assert [int(r[0]) for r in rows] == sorted(cli.EXIT_CODES)


def test_no_hand_counted_test_total():
    assert not re.search(r"\b\d+ tests\b", README), "a test count goes stale with every new test"
