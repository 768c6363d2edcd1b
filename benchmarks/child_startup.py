"""What a step child spends before and after its work (issue 29): the imports of each child's entry, and
the interpreter's exit, each in a fresh process, median of --repeat.

The imports are the ones each child's "imports" phases time (vlmdet/pipeline/child.py and the step
functions): train = vlmdet.training.train, then TRL's SFTTrainer and PEFT's LoraConfig; evaluate =
vlmdet.prediction.evaluate, then PEFT (an adapter's evaluation) and the model class; merge =
vlmdet.publishing.merge with the data helpers, then PEFT. `-X importtime` of the same imports names the
top packages by their own import seconds.

The exit: a process holding what a step child imports (torch, transformers, PEFT, TRL) takes seconds to
end after its last line (the interpreter tears down ~4,000 modules); `fast` ends it with os._exit from an
atexit callback registered first, so it runs after every other atexit callback (logging's shutdown is
called explicitly: it was registered before).

    python benchmarks/child_startup.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILDREN = {
    "train": ["from vlmdet.training.train import train", "from peft import LoraConfig; from trl import SFTTrainer"],
    "evaluate": ["from vlmdet.prediction.evaluate import evaluate",
                 "from peft import PeftModel; from transformers import AutoModelForImageTextToText"],
    "merge": ["from vlmdet.data.images import open_image; from vlmdet.publishing.merge import merge; "
              "from vlmdet.data.samples import load_split", "from peft import PeftModel"],
}

IMPORT_PROBE = """
import sys, time, json
out = []
for stmt in sys.argv[1:]:
    t = time.perf_counter(); exec(stmt); out.append(time.perf_counter() - t)
print(json.dumps(out))
"""

EXIT_PROBE = """
import atexit, logging, os, sys, time
if sys.argv[1] == "fast":
    def _end():
        logging.shutdown()
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(0)
    atexit.register(_end)
import torch, transformers, peft, trl
from transformers import AutoModelForImageTextToText
from trl import SFTTrainer
open(sys.argv[2], "w").write(repr(time.time()))
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1"}


def import_seconds(stmts: list[str]) -> list[float]:
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *stmts], capture_output=True, text=True, env=env(),
                         cwd=REPO, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def top_packages(stmts: list[str], n: int = 8) -> list[tuple[str, float]]:
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "; ".join(stmts)], capture_output=True,
                         text=True, env=env(), cwd=REPO, check=True).stderr
    own: collections.Counter = collections.Counter()
    for line in err.splitlines():
        if m := re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line):
            own[m.group(2).split(".")[0]] += int(m.group(1)) / 1e6
    return [(k, round(v, 2)) for k, v in own.most_common(n)]


def exit_seconds(mode: str) -> float:
    with tempfile.NamedTemporaryFile(suffix=".t") as stamp:
        proc = subprocess.Popen([sys.executable, "-c", EXIT_PROBE, mode, stamp.name], env=env(), cwd=REPO)
        proc.wait()
        ended = time.time()
        return ended - float(Path(stamp.name).read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    from importlib.metadata import version

    print(f"\nchild_startup: {platform.node()} ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}), "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}, torch "
          f"{version('torch')}, transformers {version('transformers')}, peft {version('peft')}, trl {version('trl')}; "
          f"median of {args.repeat} fresh processes\n")
    print("| child | entry imports s | the step's own imports s | top packages by own import s |")
    print("| --- | ---: | ---: | --- |")
    for child, stmts in CHILDREN.items():
        runs = [import_seconds(stmts) for _ in range(args.repeat)]
        first, second = (statistics.median(r[i] for r in runs) for i in range(2))
        top = ", ".join(f"{k} {v}" for k, v in top_packages(stmts))
        print(f"| {child} | {first:.2f} | {second:.2f} | {top} |")
    print("\n| a process holding torch, transformers, PEFT, TRL | exit s |")
    print("| --- | ---: |")
    for mode in ("normal", "fast"):
        print(f"| {mode} | {statistics.median(exit_seconds(mode) for _ in range(args.repeat)):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
