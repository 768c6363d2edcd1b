"""The model card (README.md with YAML front matter) and `vlmdet.json`, written and read back.

The card is what the Hub shows and indexes: its `model-index` carries mAP, mAP50 and mAP75 on the
named split, with the Hub dataset's commit as `dataset.revision` (None for local data) and the
evaluation data's fingerprint in `dataset.args.fingerprint`, so the next run's gate can tell
whether the champion was measured on the same data. The provenance (dataset and base-model
revisions, library versions; vlmdet.run.provenance) is in the front matter, the body and vlmdet.json. `vlmdet.json` holds the same facts in full
(config, metrics, fingerprint, gate) for machines; the card is the source of truth when both exist
because it is the file people edit on the Hub.
"""
from __future__ import annotations

import json
import logging
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData
from huggingface_hub.repocard_data import EvalResult, model_index_to_eval_results

from vlmdet.config.settings import RunConfig
from vlmdet.config.specs import split_spec
from vlmdet.formats.base import format_class
from vlmdet.decide.gate import decision_markdown
from vlmdet.run.keys import REPO_ID
from vlmdet.run.records import CONTENT, AdapterRef, Champion, DatasetRef, EvalReport, GateDecision
from vlmdet.modeling.carried import ANSWER_SETTINGS, META_FILE

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
LOSS_CURVE = "assets/loss_curve.png"
PREVIEW = "assets/predictions.png"
GATE_PICTURE = "assets/gate_disagreements.png"
PREDICTIONS = "eval/predictions.json"  # the published model's detections on its test split (COCO results)
METRIC_NAMES = {"map": "mAP@[.5:.95]", "map50": "mAP@.5", "map75": "mAP@.75"}

_HUB_SHA = re.compile(r"^[0-9a-f]{40}$")  # a Hub commit; our fingerprints are 64 hex characters


def hub_dataset_id(source: str) -> str | None:
    """`hub:ORG/NAME[@...]` -> ORG/NAME; other specs (synthetic, local COCO) have no Hub id."""
    kind, rest = split_spec(source, "data.dataset", default="")
    if kind != "hub":
        return None
    name = rest.split("@", 1)[0]
    return name if REPO_ID.match(name) else None


def dataset_label(source: str) -> str:
    """A readable dataset name that never leaks a local path beyond its last component."""
    if hub := hub_dataset_id(source):
        return hub
    if source.startswith("coco:"):
        return "coco:" + Path(source[5:]).name
    return source or "unknown"


# An absolute local path inside a value: `/...` (not `//`, not after a word, `.`, `-` or `/`, so URLs, Hub
# ids and relative paths stay) or `~/...`, or a `file:` URL (`file:///home/...`, `file://host/...`); up to
# whitespace, quotes or brackets. A space belongs to the path when the word after it runs on into
# another `/` (`/home/John Smith/x`): a folder name with spaces would otherwise leak its second half.
_PATH_CHAR = r"[^\s'\"`,;()\[\]{}<>|]"
_LOCAL_PATH = re.compile(r"(?:\bfile:(?://[^/\s'\"`]*)?(?=/)|(?<![\w.~/-]))(?:~/|/(?![/\s]))"
                         rf"(?:{_PATH_CHAR}|[ \t]+(?=[^\s'\"`,;()\[\]{{}}<>|/]+/))*")


def public_text(text: str) -> str:
    """`text` with every absolute local path replaced by `<local>/NAME`: published files name what a
    run used, never where it sat on the machine that trained (a user name, a mount layout)."""
    def repl(m: re.Match) -> str:
        path, tail = m.group(), ""
        while path and path[-1] in ".:":  # sentence punctuation after a path is not part of it
            path, tail = path[:-1], path[-1] + tail
        name = Path(path).name
        return (f"<local>/{name}" if name else "<local>") + tail
    return _LOCAL_PATH.sub(repl, text)


def public(value: Any) -> Any:
    """`value` (JSON-like) with public_text applied to every string in it."""
    if isinstance(value, str):
        return public_text(value)
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(v) for v in value]
    return value


def build_metadata(*, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef, decision: GateDecision,
                   config: RunConfig, run_id: str, model_name: str) -> dict[str, Any]:
    """The content of vlmdet.json: everything a later run (or a person) needs to judge this model,
    with no local path in it (the gate's picture is named by its place in the publication)."""
    gate = decision.to_dict()
    gate["picture"] = GATE_PICTURE if decision.picture else None
    meta = public(_metadata(report=report, dataset=dataset, adapter=adapter, gate=gate, config=config,
                            run_id=run_id, model_name=model_name))
    # the model's contract (what it was trained to answer), text and never a path: kept as written
    meta["config"]["model"]["prompt"] = config.model.prompt
    meta["config"]["data"]["category"] = config.data.category
    return meta


def _metadata(*, report: EvalReport, dataset: DatasetRef, adapter: AdapterRef, gate: dict[str, Any],
              config: RunConfig, run_id: str, model_name: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "preset": config.name,
        "base_model": base_model_id(config.model.base, adapter.base_model),
        "family": config.model.family,
        "model_name": model_name,
        "metrics": report.metrics(),
        "eval": {"split": report.split, "num_images": report.num_images, "parse_failures": report.parse_failures,
                 "data_fingerprint": report.data_fingerprint or dataset.fingerprint},
        "dataset": {"source": dataset_label(dataset.source), "hub_id": hub_dataset_id(dataset.source or config.data.dataset),
                    "fingerprint": dataset.fingerprint,
                    "counts": dataset.counts, "quarantine": dataset.quarantine_counts, "category": dataset.category},
        "adapter": {"global_step": adapter.global_step, "final_loss": adapter.losses[-1] if adapter.losses else None,
                    "selected_step": adapter.selected_step, "validation": adapter.validation},
        "provenance": adapter.provenance or None,
        "gate": gate,
        "config": config.to_dict(),
    }


def render_card(meta: dict[str, Any], decision: GateDecision, *, license: str, has_loss_curve: bool,
                has_preview: bool, has_gate_picture: bool = False, load_name: str | None = None) -> str:
    """README.md text: YAML front matter (model-index etc.) and a body for people; the decision shown is
    the public one of `meta` (no local paths). load_name: what the model loads by where it is published
    (Target.load_name(): a Hub id), None where the target has no such name."""
    decision = GateDecision.from_dict(meta["gate"])
    ev = meta["eval"]
    ds = meta["dataset"]
    hub_ds = ds.get("hub_id")
    base = meta["base_model"]
    prov = meta.get("provenance") or {}
    revision = (prov.get("dataset") or {}).get("revision")
    results = [
        EvalResult(task_type="object-detection", task_name="Object Detection",
                   dataset_type=hub_ds or ds["source"], dataset_name=ds["source"], dataset_split=ev["split"],
                   # a Hub commit of the dataset, never a hash of ours (the Hub links it)
                   dataset_revision=revision if hub_ds and _HUB_SHA.match(revision or "") else None,
                   dataset_args={"fingerprint": ev["data_fingerprint"]} if ev["data_fingerprint"] else None,
                   metric_type=key, metric_name=METRIC_NAMES[key], metric_value=round(float(val), 6))
        for key, val in meta["metrics"].items()
    ]
    base_revision = (prov.get("base_model") or {}).get("revision")
    data = ModelCardData(
        model_name=meta["model_name"], license=license, library_name="transformers",
        pipeline_tag="image-text-to-text",
        # base_model must be a Hub id for the Hub to accept the card; tiny:/local bases are not.
        base_model=base if REPO_ID.match(base or "") else None,
        datasets=[hub_ds] if hub_ds else None,
        tags=["vlmdet", "object-detection", meta["family"], "qlora" if meta["config"]["model"]["quantization"] == "nf4"
              else "lora", ds.get("category", "nutrition-table")],
        metrics=["map"], eval_results=results,
        **({"base_model_revision": base_revision} if base_revision else {}),
    )
    m = meta["metrics"]
    config_yaml = yaml.safe_dump(meta["config"], sort_keys=False).strip()
    body = [
        f"# {meta['model_name']}",
        "",
        f"A {meta['family']} vision-language model fine-tuned with LoRA by vlmdet to detect "
        f"**{ds.get('category', 'nutrition-table')}** regions in photos. It answers a detection prompt with boxes in the "
        "family's native format; vlmdet parses them into xyxy pixel boxes.",
        "",
        *how_to_use(meta, load_name),
        "## Intended use and limits",
        "",
        f"- Intended: locating {ds.get('category')} regions on product photos similar to the training data, as a "
        "first stage before OCR or human review.",
        "- Not intended: safety-critical decisions, or images unlike the training distribution (other languages, "
        "layouts, heavy blur) without re-measuring mAP on them.",
        "- A box's score is the geometric-mean probability, from the raw logits of greedy decoding, of the tokens "
        f"of its coordinates ({format_class(meta['family']).score_span}); "
        "it ranks detections but is not a calibrated probability.",
        f"- Measured on {ev['num_images']} held-out images only; {ev['parse_failures']} answers could not be parsed.",
        "",
        "## Evaluation",
        "",
        f"COCO bbox AP (pycocotools) on the `{ev['split']}` split of `{ds['source']}`.",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {METRIC_NAMES[k]} | {float(v):.4f} |" for k, v in m.items()),
        "",
        "## Dataset",
        "",
        f"- Source: `{ds['source']}`",
        f"- Fingerprint: `{ds['fingerprint']}` (evaluation data: `{ev['data_fingerprint']}`)",
        f"- Counts: `{json.dumps(ds['counts'])}`",
        f"- Quarantined: `{json.dumps(ds['quarantine'])}`",
        "",
        "## Publication gate",
        "",
        decision_markdown(decision),
        *gate_comparison_section(decision, has_gate_picture),
    ]
    body += provenance_markdown(prov)
    if has_preview:
        body += ["## Predictions on test images", "", f"![predictions]({PREVIEW})", ""]
    if has_loss_curve:
        body += ["## Training loss", "", f"![loss curve]({LOSS_CURVE})", ""]
    body += [
        "## Training configuration",
        "",
        f"Base model: `{base}`; adapter trained for {meta['adapter']['global_step']} steps; run `{meta['run_id']}`.",
        "",
        "```yaml",
        config_yaml,
        "```",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def gate_comparison_section(decision: GateDecision, has_picture: bool = False) -> list[str]:
    """Card lines: how this model compared with the one it replaced, on the same test images."""
    if decision.replaced_unreadable:
        return [f"This model replaced one that could not be read ({decision.champion_unreadable}), on purpose: "
                "`gate.replace_unreadable_champion` was set, and the threshold alone decided.", ""]
    if decision.p_better is None:
        return ["This model was the first at its target: the threshold alone decided.", ""]
    how = ("the previous model was evaluated again on this run's test split" if decision.champion_evaluated
           else "both were measured on the same test split")
    lines = [
        "### Compared with the model it replaced",
        "",
        f"On the same {decision.images} test images ({how}): {decision.metric} {decision.value:.4f} against "
        f"{decision.champion:.4f}. A paired bootstrap over the images ({decision.resamples} resamples) puts the "
        f"difference in [{decision.ci_low:+.4f}, {decision.ci_high:+.4f}] (95%) and finds this model better in "
        f"{decision.p_better:.1%} of resamples (required: {decision.min_probability:.0%}).",
        "",
    ]
    if has_picture:
        lines += ["Where the two disagreed most (previous model left, this one right; green: ground truth):", "",
                  f"![disagreements]({GATE_PICTURE})", ""]
    return lines


def provenance_markdown(prov: dict[str, Any]) -> list[str]:
    """The card's Provenance section: what to load to reproduce this model."""
    if not prov:
        return []
    ds, base = prov.get("dataset") or {}, prov.get("base_model") or {}
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in (prov.get("versions") or {}).items())
    return ["## Provenance", "",
            f"- Dataset: `{ds.get('source')}` at revision `{ds.get('revision') or 'n/a (local data)'}`",
            f"- Base model: `{base.get('id')}` at revision `{base.get('revision') or 'n/a'}`"
            + (f" (local files hash `{base['files_hash']}`)" if base.get("files_hash") else ""),
            f"- Trained with: {versions}; Python {prov.get('python', '?')}", ""]


def champion_from_card(card_text: str | None, meta: dict[str, Any] | None, source: str,
                       files: list[str] | None = None) -> Champion:
    """The champion's metrics from a card's model-index (preferred) or vlmdet.json, with its settings.

    Always a Champion, never a crash: one that cannot be judged (a card or vlmdet.json of the wrong
    shape, no numbers, an answer setting missing, a family this vlmdet cannot parse, no loadable model
    among `files`) is marked `unreadable` with a reason naming the file and the field, fault CONTENT
    (the target answered; what it holds cannot be judged), never turned into "no champion".
    `files`: the target's file list (paths in the repo or folder), None where not known.
    """
    metrics: dict[str, float] = {}
    fingerprint = split = run_id = ""
    config: dict = {}
    front, problem = _front_matter(card_text)
    if not problem:
        problem, results = _card_results(front)
        for r in results:
            key = str(r.metric_type).lower().replace("@", "").replace(".", "")
            if key in METRIC_NAMES and _is_number(r.metric_value):
                metrics[key] = float(r.metric_value)
                fingerprint = fingerprint or _card_fingerprint(r)
                split = split or (r.dataset_split or "")
    problem = problem or _meta_problem(meta)
    if meta and not problem:  # every field read here has the type it is read as
        config = meta.get("config", {})
        for k, v in meta.get("metrics", {}).items():
            if k in METRIC_NAMES:
                metrics.setdefault(k, float(v))
        ev = meta.get("eval", {})
        fingerprint = fingerprint or ev.get("data_fingerprint", "")
        split = split or ev.get("split", "")
        run_id = meta.get("run_id", "")
    unreadable = problem or _why_unreadable(card_text, meta, metrics, config, files)
    return Champion(metrics=metrics, data_fingerprint=fingerprint, split=split, source=source, run_id=run_id,
                    config=config, unreadable=unreadable, fault=CONTENT)


def _kind(value: Any) -> str:
    """A value's JSON/YAML type, as a reason says it ("a string", "a mapping")."""
    if value is None:
        return "null"
    name = {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        type(value), type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _a(value: Any) -> str:
    """How a wrong value reads in a reason: its type and (shortened) the value itself."""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return "null" if value is None else f"{_kind(value)} ({shown})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _front_matter(card_text: str | None) -> tuple[dict, str]:
    """(the card's YAML front matter, "") or ({}, why it cannot be read). No front matter is {}: a card
    without numbers, judged by vlmdet.json."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK  # the Hub's own rule for where the block is

    match = REGEX_YAML_BLOCK.search(card_text or "")
    if not match:
        return {}, ""
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {card_text[:match.start(2)].count(chr(10)) + mark.line + 1}" if mark else ""
        return {}, (f"{CARD_FILE}: its front matter (between the two `---` lines) is not valid YAML{line}: "
                    f"{getattr(err, 'problem', None) or type(err).__name__}")
    if data is None:
        return {}, ""
    if not isinstance(data, dict):
        return {}, f"{CARD_FILE}: its front matter is {_a(data)}, expected a mapping (`key: value` lines)"
    return data, ""


_MODEL_INDEX_SHAPE = "a list of {name, results: [{task, dataset, metrics: [{type, value}]}]}"


def _card_results(front: dict) -> tuple[str, list[EvalResult]]:
    """("", the eval results of the front matter's model-index) or (why it is not the Hub's shape, [])."""
    index = front.get("model-index")
    if index is None:
        return "", []
    where = f"{CARD_FILE}: its front matter's"

    def wrong(field: str, value: Any, expected: str) -> tuple[str, list]:
        return f"{where} `{field}` is {_a(value)}, expected {expected} ({_MODEL_INDEX_SHAPE})", []

    if not isinstance(index, list) or not index:
        return wrong("model-index", index, "a non-empty list")
    for i, model in enumerate(index):
        if not isinstance(model, dict):
            return wrong(f"model-index[{i}]", model, "a mapping")
        results = model.get("results")
        if not isinstance(results, list):
            return wrong(f"model-index[{i}].results", results, "a list")
        for j, result in enumerate(results):
            field = f"model-index[{i}].results[{j}]"
            if not isinstance(result, dict):
                return wrong(field, result, "a mapping")
            for part in ("task", "dataset"):
                if not isinstance(result.get(part), dict):
                    return wrong(f"{field}.{part}", result.get(part), "a mapping")
            entries = result.get("metrics")
            if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
                return wrong(f"{field}.metrics", entries, "a list of mappings")
    try:
        _, results = model_index_to_eval_results(index)
    except (KeyError, TypeError, ValueError) as err:  # a required key missing deeper down
        return f"{where} `model-index` is not the Hub's shape ({_MODEL_INDEX_SHAPE}): {type(err).__name__} {err}", []
    return "", results


# The fields of vlmdet.json a champion is read by, and the type each is read as (missing is allowed:
# no run id, no numbers of its own, or no record of the data it was measured on, which means evaluating it again).
_META_FIELDS = {"run_id": (str, "a string"), "metrics": (dict, "a mapping"), "eval": (dict, "a mapping"),
                "config": (dict, "a mapping")}
_EVAL_FIELDS = ("split", "data_fingerprint")


def _meta_problem(meta: dict | None) -> str:
    """Why vlmdet.json cannot be read as what vlmdet wrote ("" when it can): the first field of the wrong type."""
    if meta is None:
        return ""
    for name, (typ, expected) in _META_FIELDS.items():
        if name in meta and not isinstance(meta[name], typ):
            return f"{META_FILE}: `{name}` is {_a(meta[name])}, expected {expected}"
    for key, value in meta.get("metrics", {}).items():
        if key in METRIC_NAMES and not _is_number(value):
            return f"{META_FILE}: `metrics.{key}` is {_a(value)}, expected a number"
    for name in _EVAL_FIELDS:
        value = meta.get("eval", {}).get(name, "")
        if not isinstance(value, str):
            return f"{META_FILE}: `eval.{name}` is {_a(value)}, expected a string"
    return ""


def _why_unreadable(card_text: str | None, meta: dict | None, metrics: dict, config: dict,
                    files: list[str] | None) -> str:
    """Why a champion cannot be judged ("" when it can), each with the fact an operator can check."""
    if card_text is None and meta is None:
        return (f"it has neither a model card ({CARD_FILE}) nor {META_FILE}, so its numbers and settings are unknown "
                "(not published by vlmdet, or hand-edited)")
    if not metrics:
        return (f"neither its card's model-index nor its {META_FILE} holds an mAP number (a hand-edited card, or "
                "not published by vlmdet)")
    if meta is None:
        return (f"it has no readable {META_FILE}, so its answer settings (family, prompt, pixel budget) are unknown; "
                "evaluating it with today's settings would score a model of another format near 0")
    if "config" not in meta:
        return (f"{META_FILE}: `config` is missing, so its answer settings (family, prompt, category, pixel budget, "
                "answer length) are unknown")
    return _answer_problem(config) or _files_problem(files)


def _answer_problem(config: dict) -> str:
    """Why the champion's answer settings (vlmdet/config/settings.py, applies "answer") cannot all be taken from its
    vlmdet.json `config` ("" when they can): it is evaluated with its own, every one of them, or not at all."""
    from vlmdet.config.settings import ConfigError, settings
    from vlmdet.formats import REGISTRY

    declared, theirs = settings(), {}
    for key in ANSWER_SETTINGS:
        section, name = key.split(".", 1)
        part = config.get(section, {})
        if not isinstance(part, dict):
            return f"{META_FILE}: `config.{section}` is {_a(part)}, expected a mapping"
        if name not in part:
            return (f"{META_FILE}: `config.{key}` is missing; a champion is evaluated with every one of its own "
                    f"answer settings ({', '.join(ANSWER_SETTINGS)}), never today's {key}, which may not be what it was trained "
                    "to answer")
        value, default = part[name], declared[key].default
        if not _same_type(value, default):
            return f"{META_FILE}: `config.{key}` is {_a(value)}, expected {_kind(default)}"
        theirs[key] = value
    family = theirs.get("model.family")
    if family not in REGISTRY:
        return (f"its {META_FILE} names model family {family!r}, which this vlmdet cannot parse (known: "
                f"{', '.join(REGISTRY)})")
    sections = typing.get_type_hints(RunConfig)
    for section in dict.fromkeys(key.split(".", 1)[0] for key in theirs):
        try:  # each section alone checks its allowed values and its own rules (min_pixels <= max_pixels)
            sections[section](**{k.split(".", 1)[1]: v for k, v in theirs.items() if k.startswith(section + ".")})
        except ConfigError as err:
            return f"{META_FILE}: `config.{section}` holds answer settings this vlmdet refuses: {err}"
    return ""


def _same_type(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return _is_number(value)
    return isinstance(value, type(default))


# What evaluating a merged model loads beside its weights (vlmdet.modeling.load.load_for_inference:
# AutoProcessor from the same folder): one file of each group, at the top of the repo or folder.
_PROCESSOR_FILES = (
    ("image processor config", ("preprocessor_config.json", "processor_config.json")),
    ("tokenizer", ("tokenizer.json", "vocab.json + merges.txt")),
    ("chat template", ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "processor_config.json")),
)


def _files_problem(files: list[str] | None) -> str:
    """Why the files at the target are not a model vlmdet can load ("" when they are; files None: not known)."""
    if files is None:
        return ""
    top = {f for f in files if "/" not in f}
    if "config.json" not in top:
        return "it has no config.json, so its model cannot be loaded"
    if not any(f.endswith(".safetensors") for f in top):
        from vlmdet.modeling.load import NOT_WEIGHTS, PICKLE_SUFFIXES  # (imports torch: only on this path)

        pickles = sorted(f for f in top if f.endswith(PICKLE_SUFFIXES) and f not in NOT_WEIGHTS)
        if pickles:
            return (f"its weights are pickle files only ({', '.join(pickles[:3])}) and no *.safetensors: vlmdet loads "
                    "safetensors only, since unpickling a checkpoint can run arbitrary code. Convert them once where "
                    "you trust them (AutoModelForImageTextToText.from_pretrained(PATH).save_pretrained(OUT) writes "
                    "model.safetensors) and publish OUT")
        return "it has no weights (no *.safetensors file), so its model cannot be loaded"
    missing = [f"{what} ({' or '.join(names)})" for what, names in _PROCESSOR_FILES
               if not any(set(n.split(" + ")) <= top for n in names)]
    if missing:
        return (f"it has no {', no '.join(missing)}, which evaluating it loads from the same place as its weights "
                "(the processor that save_pretrained writes)")
    return ""


def base_model_id(configured: str, resolved: str | None) -> str:
    """The base as the card may name it: its Hub id, or for a base that is not on the Hub what is
    known about it, said as such. Never a path of the machine that trained (`resolved` is the
    absolute folder that `tiny:`, `asset:` and local bases resolve to)."""
    configured = configured or resolved or ""
    if configured.startswith("asset:"):
        return f"{configured} (a model shipped inside vlmdet, vlmdet/assets/{configured[6:]}; not on the Hub)"
    if configured.startswith("tiny:"):
        return f"{configured} (random weights built in-process by vlmdet for tests; not on the Hub)"
    local = Path(configured).expanduser()
    if local.is_absolute() or local.exists() or (resolved and resolved != configured):
        return f"a local folder named {local.name!r} (not a Hub id; its origin is not recorded)"
    return configured if REPO_ID.match(configured) else f"{configured!r} (not a Hub id)"


def usage_snippet(repo: str, prompt: str, family: str) -> str:
    """Python that loads `repo`, detects on photo.jpg and prints xyxy boxes in its pixels."""
    return "\n".join([
        "import json, re",
        "from PIL import Image, ImageOps",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f"repo = {json.dumps(repo)}",
        "processor = AutoProcessor.from_pretrained(repo)  # carries the pixel budget the model was measured with",
        'model = AutoModelForImageTextToText.from_pretrained(repo, dtype="auto", device_map="auto")',
        'image = ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB")  # as a viewer shows it',
        "W, H = image.size",
        f'messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {json.dumps(prompt)}}}]}}]',
        "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
        "# add_special_tokens=False: the chat template already holds every special token, as in training",
        'inputs = processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt").to(model.device)',
        "out = model.generate(**inputs)  # greedy, both stop tokens, answer length: generation_config.json",
        'answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)',
        *format_class(family).usage_parse,  # the family's own code (vlmdet/formats)
        "print(boxes)  # [[x1, y1, x2, y2], ...] in pixels of photo.jpg",
    ])


def how_to_use(meta: dict[str, Any], load_name: str | None = None) -> list[str]:
    """The card's "How to use" section: the exact prompt, plain transformers code, the answer format.
    load_name: what the model loads by where it is published (a Hub id); None: a path to the folder."""
    from vlmdet.formats import Box, get_format

    cfg = meta["config"]
    family, category = meta["family"], cfg["data"]["category"]
    prompt = cfg["model"]["prompt"].format(category=category)
    repo = load_name or f"path/to/{meta['model_name']}"
    lo, hi = cfg["model"]["min_pixels"], cfg["model"]["max_pixels"]
    fmt = get_format(family, lo, hi)
    example = fmt.render([Box(64, 48, 320, 240, category)], 640, 480, category)
    coords = fmt.coordinates
    return [
        "## How to use",
        "",
        f"The exact prompt (one image, then this text, in the chat template): `{prompt}`",
        "",
        "With plain `transformers` (no vlmdet needed); this prints the boxes `vlmdet predict` gives:",
        "",
        "```python",
        usage_snippet(repo, prompt, family),
        "```",
        "",
        f"Answer format ({family}): one entry per box, coordinates {coords}; a box at (64, 48)-(320, 240) of a "
        f"640x480 photo is written `{example}`, no object `{fmt.no_object_answer}`. The saved processor resizes every "
        f"image into {lo}-{hi} pixels (the budget the model was trained and measured with), and "
        "`generation_config.json` decodes greedily (no sampling, no repetition penalty: it would penalise a "
        "coordinate digit already written) and stops at `<|im_end|>` or `<|endoftext|>`.",
        "",
        f"Served over HTTP with batching: `vlmdet serve --model {load_name or 'FOLDER'}` (see vlmdet's docs/serving.md).",
        "",
    ]


def _card_fingerprint(result: EvalResult) -> str:
    """The evaluation data's fingerprint in a model-index entry: dataset.args.fingerprint, or (cards
    written before the revision became the Hub's) a 64-hex dataset.revision."""
    args = result.dataset_args if isinstance(result.dataset_args, dict) else {}
    if args.get("fingerprint"):
        return str(args["fingerprint"])
    rev = result.dataset_revision or ""
    return rev if re.fullmatch(r"[0-9a-f]{64}", rev) else ""
