"""The `vlmdet` command.

Settings options (`--train.max_steps 10`) are generated from the config dataclasses, so their
defaults and help live in one place (vlmdet/config.py). Commands that run the Prefect flow or read
the Prefect API import it lazily: the library itself never imports Prefect.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from vlmdet.config import ConfigError, RunConfig, field_help, list_presets, load_preset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def _add_settings(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("settings (override the preset; see vlmdet/config.py)")
    for key, (default, help_) in field_help().items():
        g.add_argument(f"--{key}", dest=f"set:{key}", default=None, metavar="V", help=f"{help_} [default {default!r}]")
    g.add_argument("--set", dest="set_pairs", action="append", default=[], metavar="KEY=VALUE",
                   help="Any setting by dotted key, repeatable.")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {k[4:]: v for k, v in vars(args).items() if k.startswith("set:") and v is not None}
    for pair in args.set_pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.max_steps=10")
        out[key] = value
    return out


def cmd_synth(args: argparse.Namespace) -> int:
    from vlmdet.data.synth import generate

    path = generate(Path(args.out), args.num, seed=args.seed, size=tuple(args.size))
    print(path)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from vlmdet.metrics import coco_map

    gt = json.loads(Path(args.gt).read_text())
    pred = json.loads(Path(args.pred).read_text())
    print(json.dumps(coco_map(gt, pred)))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from flows.retrain import retrain

    overrides = _overrides(args)
    load_preset(args.preset, overrides)  # fail on a bad setting before Prefect starts
    summary = retrain(preset=args.preset, workdir=args.workdir, threshold=args.threshold, dataset=args.dataset,
                      overrides=overrides, force=args.force)
    _print_summary(Path(args.workdir), summary)
    return 0


def _print_summary(workdir: Path, s: dict[str, Any]) -> None:
    g = s["gate"]
    print()
    if s.get("skipped"):
        print(f"Nothing new: {s.get('skip_reason')}. Pass --force to retrain.")
    rows = [("fine-tuned", s["metrics"]), ("base", s.get("base_metrics")), ("merged", s.get("merged_metrics"))]
    print(f"{'model':<12}{'mAP':>8}{'mAP50':>8}{'mAP75':>8}")
    for name, m in rows:
        if m:
            print(f"{name:<12}{m['map']:>8.3f}{m['map50']:>8.3f}{m['map75']:>8.3f}")
    print(f"gate:      {'PASSED' if g['passed'] else 'closed'} — {g['reason']}")
    print(f"adapter:   {s['adapter']}")
    if s.get("published"):
        print(f"published: {s['published']['target']}")
    if s.get("evaluation", {}).get("preview"):
        print(f"preview:   {s['evaluation']['preview']}")
    print(f"summary:   {(workdir / 'summary.json').resolve()}")


def _prepared(config, workdir: Path):
    """The flow's data layout without Prefect: WORKDIR/data/<data_key>/{raw,prepared}."""
    from vlmdet.data import materialize, prepare
    from vlmdet.keys import data_key

    root = workdir / "data" / data_key(config)
    raw = materialize(config.data.dataset, root / "raw", seed=config.data.seed, image_size=tuple(config.data.image_size))
    return prepare(raw, root / "prepared", config.data, source=config.data.dataset)


def cmd_train(args: argparse.Namespace) -> int:
    from vlmdet.keys import training_key
    from vlmdet.training.train import train

    config = load_preset(args.preset, _overrides(args))
    wd = Path(args.workdir).resolve()
    data = _prepared(config, wd)
    adapter = train(data, config, wd / "train" / training_key(config, data.fingerprint))
    print(json.dumps({"adapter": adapter.path, "global_step": adapter.global_step, "resumed_from": adapter.resumed_from,
                      "dataset": data.fingerprint}, indent=1))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vlmdet.evaluation import evaluate

    config = load_preset(args.preset, _overrides(args))
    wd = Path(args.workdir).resolve()
    report = evaluate(args.model, _prepared(config, wd), config, wd / "eval" / Path(args.model).name)
    print(json.dumps(dict(report.metrics(), split=report.split, images=report.num_images,
                          parse_failures=report.parse_failures, predictions=report.predictions)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vlmdet.prediction.cli import predict_files

    # No preset: RunConfig's defaults (a full-length answer); family and pixel budget come from
    # the model folder. The smoke preset's short answers would cut a JSON box in half.
    config = load_preset(args.preset, _overrides(args)) if args.preset else RunConfig().override(_overrides(args))
    files = []
    for item in args.images:
        p = Path(item)
        files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    if not files:
        raise ConfigError("no images given: pass image files or folders holding .jpg/.png files")
    explicit = set(_overrides(args))
    out = predict_files(args.model, files, Path(args.out), config, explicit)
    print(out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from vlmdet.serving.server import serve

    # As predict: the built-in defaults (or --preset), family and pixel budget read from the model.
    config = load_preset(args.preset, _overrides(args)) if args.preset else RunConfig().override(_overrides(args))
    serve(args.model, config, set(_overrides(args)), host=args.host, port=args.port, token_file=args.token_file,
          revision=args.revision)
    return 0


def cmd_retries(args: argparse.Namespace) -> int:
    from flows.retries import format_attempts, task_run_attempts

    print(format_attempts(task_run_attempts(args.flow_run)))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        print(name)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vlmdet", description=__doc__.splitlines()[0] + " Train, measure and publish "
                                 "a Qwen2-VL-family nutrition-table detector.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="Generate a synthetic COCO dataset of nutrition tables.")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("score", help="COCO bbox mAP of a predictions file against ground truth (JSON to stdout).")
    p.add_argument("--gt", required=True, help="COCO annotations JSON")
    p.add_argument("--pred", required=True, help="COCO results JSON (image_id, category_id, bbox xywh, score)")
    p.set_defaults(fn=cmd_score)

    for name, fn, help_ in [("retrain", cmd_retrain, "Run the retrain flow: prepare, train, evaluate, gate, merge, publish."),
                            ("train", cmd_train, "Prepare data and train an adapter, without Prefect."),
                            ("evaluate", cmd_evaluate, "mAP of a model (adapter or merged folder) on the preset's data.")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--preset", default="smoke", help=f"one of {', '.join(list_presets())}, or a YAML path")
        p.add_argument("--workdir", default="runs/latest")
        if name == "retrain":
            p.add_argument("--threshold", type=float, default=None, help="shortcut for --gate.threshold")
            p.add_argument("--dataset", default=None, help="shortcut for --data.dataset: synth:N, coco:PATH, hub:ORG/NAME")
            p.add_argument("--force", action="store_true", help="retrain even when nothing changed since the last success")
        if name == "evaluate":
            p.add_argument("--model", required=True)
        _add_settings(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("predict", help="Detect on images; writes OUT/predictions.json and a drawn image per input.")
    p.add_argument("--model", required=True, help="a merged model folder or an adapter folder")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default=None,
                   help=f"settings source for prompt, batch size, answer length (one of {', '.join(list_presets())}, "
                        "or a YAML path); default: the built-in defaults, with family and pixel budget read from --model")
    p.add_argument("images", nargs="+", help="image files or folders")
    _add_settings(p)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("serve", help="Serve a model over HTTP: POST /detect, GET /health, GET /metrics, POST /reload "
                                     "(docs/serving.md).")
    p.add_argument("--model", required=True, help="a merged model folder, an adapter folder, a local: publication "
                                                  "folder or a Hub repo ORG/NAME (followed to its newest revision)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", default=None, help="a file holding a bearer token; requests without "
                                                      "'Authorization: Bearer TOKEN' get 401 (all routes but /health)")
    p.add_argument("--revision", default="main", help="Hub repos: the branch or tag to serve and follow")
    p.add_argument("--preset", default=None, help="settings source for prompt and answer length, as for predict")
    _add_settings(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("retries", help="Every attempt of every task run of a flow run, with its error.")
    p.add_argument("flow_run", help="flow run id")
    p.set_defaults(fn=cmd_retries)

    p = sub.add_parser("presets", help="List the shipped presets.")
    p.set_defaults(fn=cmd_presets)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # one line per HTTP request to the Prefect API drowns what matters
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"vlmdet: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from vlmdet.data import DataError

        if isinstance(err, DataError):
            print(f"vlmdet: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
