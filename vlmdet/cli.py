"""The `vlmdet` command.

Settings options (`--train.max_steps 10`) are generated from the config dataclasses, so their
defaults and help live in one place (vlmdet/config/settings.py). Commands that run the Prefect flow or read
the Prefect API import it lazily: the library itself never imports Prefect.

A mistake in the input (a setting, a path, a model, a token) is one line on stderr naming the input
and the fix, and an exit code that says which kind (EXIT_CODES, README "Exit codes"); its
traceback only with -v. Prefect's own log lines about such an error are dropped from the console
(flows/console.py; they still reach the Prefect API, so the UI shows them).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from vlmdet.config.settings import REMOVED, ConfigError, RunConfig, field_help, keys_where, list_presets, load_preset

# Exit codes, documented in README "Exit codes"; scripts and schedulers can tell the kinds apart.
EXIT_OK = 0
EXIT_FAILED = 1  # a step failed for a reason that is not the input: a crash, timeout, out of memory, a bug
EXIT_CONFIG = 2  # usage or settings: unknown option, preset or setting, a bad value (argparse uses 2 as well)
EXIT_DATA = 3  # the dataset: a bad spec, a missing path, no usable images
EXIT_MODEL = 4  # the model: no such folder or repository, not a model folder, pickle-only weights
EXIT_HUB = 5  # the Hub: a missing or rejected token, an unreachable Hub, an invalid repo id
EXIT_SOME_INPUTS_FAILED = 6  # predict: some images could not be read (the rest are in predictions.json)
EXIT_CODES = {EXIT_OK: "success", EXIT_FAILED: "a step failed (not the input's fault; -v for the traceback)",
              EXIT_CONFIG: "bad command line or setting", EXIT_DATA: "bad dataset", EXIT_MODEL: "bad model",
              EXIT_HUB: "Hugging Face Hub: token or connection", EXIT_SOME_INPUTS_FAILED: "predict: an input failed"}

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


# The settings `vlmdet predict` (and any other command that only runs a trained model: `serve`)
# reads: how the model is loaded and prompted and how images are batched (declared with each field in
# vlmdet/config/settings.py, `applies=("inference",)`). Training, gate and publish settings mean nothing there,
# so its --help does not list them.
INFERENCE_SETTINGS = keys_where(applies="inference")

# `vlmdet serve`: the inference settings, its own, and the Hub endpoint a repo is followed on.
SERVE_SETTINGS = INFERENCE_SETTINGS + keys_where(applies="serve")


def add_settings(p: argparse.ArgumentParser, keys: tuple[str, ...] | list[str] | None = None) -> None:
    """Add `--KEY V` for each dotted setting in `keys` (all of vlmdet/config/settings.py when None) and `--set KEY=VALUE`.

    The hook for every command with settings: `add_settings(p, INFERENCE_SETTINGS)`, then
    `settingssettings_overrides(args)` gives the dict for `RunConfig.override`/`load_preset` (only those keys
    are accepted; another is a ConfigError naming the ones the command reads), or
    `inference_config(args)` the whole RunConfig of a model-running command.
    """
    helps = field_help()
    keys = list(helps) if keys is None else list(keys)
    unknown = [k for k in keys if k not in helps]
    if unknown:
        raise ValueError(f"add_settings: no such settings {unknown}")
    g = p.add_argument_group("settings (override the preset; see vlmdet/config/settings.py)")
    for key in keys:
        default, help_ = helps[key]
        # argparse %-formats help text: a literal % (e.g. "~30% slower") must be doubled
        g.add_argument(f"--{key}", dest=f"set:{key}", default=None, metavar="V",
                       help=f"{help_} [default {default!r}]".replace("%", "%%"))
    g.add_argument("--set", dest="set_pairs", action="append", default=[], metavar="KEY=VALUE",
                   help="Any of the settings above by dotted key, repeatable.")
    p.set_defaults(settings_keys=tuple(keys))


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, {dotted key: string value}, checked against the command's keys."""
    out = {k[4:]: v for k, v in vars(args).items() if k.startswith("set:") and v is not None}
    allowed = getattr(args, "settings_keys", ())
    command = f"vlmdet {getattr(args, 'command', None) or ''}".strip()
    for pair in getattr(args, "set_pairs", []):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.max_steps=10")
        if key not in allowed and key not in REMOVED:  # a removed setting: the configuration says what replaced it
            if key not in field_help():
                raise ConfigError(f"--set {key}: unknown setting; `{command}` reads: {', '.join(allowed)}")
            raise ConfigError(f"--set {key}: `{command}` does not use this setting; it reads: "
                              f"{', '.join(allowed)}")
        out[key] = value
    return out


def inference_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of a command that runs a trained model (predict, serve): --preset when given
    (prompt, batch size, answer length), else RunConfig's defaults, then the command-line settings.
    Family and pixel budget still come from the model folder, prompt and category from its vlmdet.json
    (a published model), unless set explicitly."""
    # The smoke preset's short answers would cut a JSON box in half, hence the defaults without --preset.
    preset = getattr(args, "preset", None)
    return load_preset(preset, settings_overrides(args)) if preset else RunConfig().override(settings_overrides(args))


def cmd_synth(args: argparse.Namespace) -> int:
    from vlmdet.data.synth import generate

    path = generate(Path(args.out), args.num, seed=args.seed, size=tuple(args.size))
    print(path)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from vlmdet.decide.metrics import coco_map

    gt = json.loads(Path(args.gt).read_text())
    pred = json.loads(Path(args.pred).read_text())
    print(json.dumps(coco_map(gt, pred)))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from vlmdet.pipeline import run as pipeline
    from vlmdet.pipeline.show import summary_text

    overrides = settings_overrides(args)
    # a bad setting, dataset spec or base model is a one-line error before Prefect starts; the flow
    # runs what was resolved here (no second lookup of the base)
    resolved = pipeline.resolve(args.preset, overrides, threshold=args.threshold, dataset=args.dataset)
    from flows.console import prefect_console  # Prefect: imported only once the input is known to be good

    with prefect_console(args.verbose, _is_user_error):
        from flows.retrain import retrain

        summary = retrain(preset=args.preset, workdir=args.workdir, threshold=args.threshold, dataset=args.dataset,
                          overrides=overrides, force=args.force, resolved=resolved.to_dict())
    print(summary_text(summary, Path(args.workdir) / "summary.json"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vlmdet.pipeline import run as pipeline
    from vlmdet.pipeline.step import Plain

    # the flow's configuration (train.profile resolved once), layout and steps, without Prefect
    resolved = pipeline.resolve(args.preset, settings_overrides(args))
    data, adapter, _ = pipeline.trained(resolved.config, pipeline.RunLayout.at(args.workdir), Plain())
    print(json.dumps({"adapter": adapter.path, "global_step": adapter.global_step, "resumed_from": adapter.resumed_from,
                      "dataset": data.fingerprint}, indent=1))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vlmdet.modeling.load import check_model_source
    from vlmdet.pipeline import run as pipeline
    from vlmdet.pipeline import steps
    from vlmdet.pipeline.step import Plain

    config = pipeline.configure(args.preset, settings_overrides(args), check_base=False)  # --model is what loads
    check_model_source(args.model, "--model")
    layout, driver = pipeline.RunLayout.at(args.workdir), Plain()
    data, _ = driver(steps.PREPARE, config, layout)
    report, _ = driver(steps.EVALUATE, args.model, data, config, layout, name=Path(args.model).name)
    print(json.dumps(dict(report.metrics(), split=report.split, images=report.num_images,
                          parse_failures=report.parse_failures, predictions=report.predictions)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    config = inference_config(args)  # a bad setting fails before torch is imported

    from tqdm.auto import tqdm

    from vlmdet.prediction.files import predict_files

    files: list[Path] = []
    for item in args.images:
        p = Path(item)
        files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    if not files:
        raise ConfigError("no images given: pass image files or folders holding .jpg/.png files")
    explicit = set(settings_overrides(args))
    out = predict_files(args.model, files, Path(args.out), config, explicit, echo=tqdm.write)
    result = json.loads(out.read_text()) if out.is_file() else {}
    failed = int(result.get("failed", 0))
    print(f"{len(files) - failed} of {len(files)} images read, {failed} failed; predictions: {out}")
    return EXIT_SOME_INPUTS_FAILED if failed else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    config = inference_config(args)  # as predict: a bad setting fails before torch is imported

    from vlmdet.serving.server import serve

    serve(args.model, config, set(settings_overrides(args)), host=args.host, port=args.port, token_file=args.token_file,
          revision=args.revision)
    return EXIT_OK


def cmd_retries(args: argparse.Namespace) -> int:
    from flows.console import prefect_console

    with prefect_console(args.verbose, _is_user_error):
        from flows.retries import format_report, latest_failed_run, run_report

        flow_run = args.flow_run
        if flow_run is None:
            flow_run = latest_failed_run(args.deployment)
            if flow_run is None:
                print(f"no failed run of {args.deployment}")
                return EXIT_OK
        print(format_report(run_report(flow_run)))
    return EXIT_OK


def cmd_presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        print(name)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vlmdet", description=__doc__.splitlines()[0] + " Train, measure and publish "
                                 "a Qwen2-VL-family nutrition-table detector.",
                                 epilog="exit codes: " + "; ".join(f"{c} {m}" for c, m in EXIT_CODES.items()))
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
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
        add_settings(p, [k for k in field_help() if not k.startswith("serve.")])  # serve.*: `vlmdet serve` only
        p.set_defaults(fn=fn)

    p = sub.add_parser("predict", help="Detect on images; a line per image, OUT/predictions.json and a drawn image "
                       f"per input. Exit {EXIT_SOME_INPUTS_FAILED} when any image could not be read.")
    p.add_argument("--model", required=True, help="a merged model folder or an adapter folder, or a Hub repo id")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default=None,
                   help=f"settings source for prompt, batch size, answer length (one of {', '.join(list_presets())}, "
                        "or a YAML path); default: the built-in defaults. Family and pixel budget are read from --model, "
                        "prompt and category from its vlmdet.json when it is a published model (--model.prompt and "
                        "--data.category still win)")
    p.add_argument("images", nargs="+", help="image files or folders")
    add_settings(p, INFERENCE_SETTINGS)
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
    add_settings(p, SERVE_SETTINGS)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("retries", help="Every attempt of a flow run and of each of its task runs, with its error "
                       "and its link in the Prefect UI.")
    p.add_argument("flow_run", nargs="?", default=None,
                   help="flow run id (default: the latest failed run of --deployment)")
    p.add_argument("--deployment", default="retrain/nightly-gpu",
                   help="FLOW/DEPLOYMENT whose latest failed run is shown when no id is given")
    p.set_defaults(fn=cmd_retries)

    p = sub.add_parser("presets", help="List the shipped presets.")
    p.set_defaults(fn=cmd_presets)
    return ap


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was when main() first ran: main() may
    run many times in one process (tests capture stderr anew each time)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def classify(err: BaseException) -> int | None:
    """The exit code of a user error (EXIT_CONFIG ... EXIT_HUB), None for anything else."""
    from vlmdet.data.errors import DataError
    from vlmdet.publishing.errors import PermanentPublishError, TransientPublishError

    name = type(err).__name__
    if name == "ModelError":  # vlmdet.modeling.load imports torch: recognised by name
        return EXIT_MODEL
    if isinstance(err, DataError):
        return EXIT_DATA
    if isinstance(err, (PermanentPublishError, TransientPublishError)):
        return EXIT_HUB  # Transient only gets here after its retries: the Hub stayed unreachable
    if isinstance(err, ConfigError):
        return EXIT_CONFIG
    if name == "StepFailed" and getattr(err, "kind", "") == "config":  # a ConfigError in the step's child process
        return EXIT_MODEL if "ModelError:" in str(err) else EXIT_CONFIG
    return None


def _is_user_error(err: BaseException) -> bool:
    return classify(err) is not None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not root.handlers:  # what logging.basicConfig does, with a handler that follows sys.stderr
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    if not args.verbose:  # one line per HTTP request to the Prefect API drowns what matters
        for noisy in ("httpx", "httpcore", "httpx2", "httpcore2"):  # huggingface_hub 2.x speaks httpx2
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("vlmdet: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every error ends as one line and a documented code
        code = classify(err)
        if args.verbose:
            traceback.print_exc()
        if code is None:
            hint = "" if args.verbose else " (rerun with -v for the traceback)"
            print(f"vlmdet: error: {type(err).__name__}: {_one_line(err)}{hint}", file=sys.stderr)
            return EXIT_FAILED
        print(f"vlmdet: error: {_one_line(err)}", file=sys.stderr)
        return code
    finally:  # main() may run again in the same process (tests): leave logging as it was
        root.setLevel(level)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
