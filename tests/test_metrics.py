"""Tests for ladic.metrics: parity with pycocoevalcap, loaders, SPICE/CLIP/BERT-Score handling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ladic import metrics
from ladic.metrics import (
    MetricsResult,
    coco_metrics,
    java_available,
    load_references_json,
    load_results_json,
)

JAVA_OK, JAVA_INFO = java_available()
needs_java = pytest.mark.skipif(not JAVA_OK, reason=f"Java is needed by pycocoevalcap ({JAVA_INFO}); "
                                                    "apt-get install default-jre-headless")

GOOD_REFERENCES = {
    1: ["A dog runs across a grassy field.", "A brown dog is running on the grass.",
        "The dog sprints through a green park."],
    2: ["A man rides a horse on a beach.", "A person riding a brown horse near the ocean.",
        "Someone on horseback by the sea."],
    3: ["Two children play soccer in a park.", "Kids kicking a ball on the grass.",
        "Two young boys playing football outside."],
    4: ["A plate of pasta with tomato sauce.", "Spaghetti topped with red sauce on a white plate.",
        "A dish of noodles with marinara."],
    5: ["A red bus drives down a city street.", "A double decker bus on the road.",
        "A large red bus in traffic."],
}
GOOD_RESULTS = {
    1: "A brown dog is running on the grass.",
    2: "a man riding a horse on the beach",
    3: "two kids play soccer on grass",
    4: "a plate of spaghetti with sauce",
    5: "a cat sleeping on a sofa",
}
GOOD_IDS = list(GOOD_RESULTS)
# Images 6..10 repeat the references of 1..5 with the captions rotated by one image, so one
# computation (one METEOR start, ~9 s) serves both the "good" and the "shuffled" captions.
SHUFFLED_IDS = [i + 5 for i in GOOD_IDS]
REFERENCES = {**GOOD_REFERENCES, **{i + 5: GOOD_REFERENCES[i] for i in GOOD_IDS}}
RESULTS = {**GOOD_RESULTS,
           **{i + 5: GOOD_RESULTS[GOOD_IDS[(k + 1) % len(GOOD_IDS)]] for k, i in enumerate(GOOD_IDS)}}


def _str_keys(d: dict) -> dict:
    return {str(k): v for k, v in d.items()}


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory) -> MetricsResult:
    if not JAVA_OK:
        pytest.skip(f"Java is needed by pycocoevalcap ({JAVA_INFO})")
    empty = tmp_path_factory.mktemp("no-spice")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(metrics.SPICE_ENV, raising=False)
        mp.setattr(metrics, "_spice_package_dir", lambda: empty)
        return coco_metrics(_str_keys(RESULTS), _str_keys(REFERENCES), spice_dir=str(empty))


@pytest.fixture(scope="module")
def reference_scores(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """pycocoevalcap's own COCOEvalCap flow (pycocotools COCO objects), SPICE left out."""
    if not JAVA_OK:
        pytest.skip(f"Java is needed by pycocoevalcap ({JAVA_INFO})")
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    tmp = tmp_path_factory.mktemp("coco")
    ann = {"images": [{"id": i} for i in REFERENCES],
           "annotations": [{"id": 10 * i + j, "image_id": i, "caption": c}
                           for i, caps in REFERENCES.items() for j, c in enumerate(caps)]}
    (tmp / "ann.json").write_text(json.dumps(ann))
    (tmp / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in RESULTS.items()]))
    coco = COCO(str(tmp / "ann.json"))
    coco_res = coco.loadRes(str(tmp / "res.json"))

    class NoSpice:
        def compute_score(self, gts, res):
            return math.nan, [math.nan] * len(gts)

        def method(self):
            return "SPICE"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coco_eval, "Spice", NoSpice)
        evaluator = coco_eval.COCOEvalCap(coco, coco_res)
        evaluator.evaluate()
    return evaluator.eval, evaluator.imgToEval


NAMES = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4",
         "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}


@needs_java
def test_matches_pycocoevalcap_exactly(computed: MetricsResult, reference_scores: tuple[dict, dict]) -> None:
    overall, per_image = reference_scores
    for ours, theirs in NAMES.items():
        assert computed.scores[ours] == overall[theirs], ours
        for img_id in REFERENCES:
            assert computed.per_image[str(img_id)][ours] == per_image[img_id][theirs], (ours, img_id)


@needs_java
def test_result_shape_and_json(computed: MetricsResult) -> None:
    assert set(computed.scores) == set(metrics.ALL_METRICS)
    assert computed.scores["SPICE"] is None and computed.scores["CLIP-Score"] is None
    assert set(computed.unavailable) == {"SPICE", "CLIP-Score"}
    assert computed.unavailable["CLIP-Score"] == "no CLIP weights supplied (pass --clip-model)"
    assert "pycocoevalcap 1.2" in computed.settings and "PTBTokenizer" in computed.settings
    assert "java: " in computed.settings
    assert ("BERT-Score with all-MiniLM-L6-v2 (not comparable to the paper's roberta-large numbers)"
            in computed.settings)
    payload = json.loads(json.dumps(computed.to_json()))
    assert payload["scores"]["SPICE"] is None
    assert payload["per_image"]["1"]["CIDEr"] == computed.per_image["1"]["CIDEr"]


@needs_java
def test_spice_unavailable_reason_without_jars(computed: MetricsResult) -> None:
    reason = computed.unavailable["SPICE"]
    assert "Stanford CoreNLP 3.6.0" in reason and metrics.SPICE_ENV in reason
    assert "stanford-corenlp-3.6.0-models.jar" in reason


@needs_java
def test_spice_broken_jars_reported_not_faked(tmp_path: Path) -> None:
    for name in metrics.CORENLP_JARS:
        (tmp_path / name).write_bytes(b"")
    jars = metrics._find_corenlp_jars(str(tmp_path))
    assert jars == (tmp_path / metrics.CORENLP_JARS[0], tmp_path / metrics.CORENLP_JARS[1])
    with pytest.raises(metrics._Unavailable, match="SPICE failed"):
        metrics._spice(jars, ["1"], {"1": ["a dog runs"]}, {"1": ["a dog"]})


@needs_java
def test_bert_score_identical_near_one_different_lower(computed: MetricsResult) -> None:
    exact = computed.per_image["1"]["BERT-Score"]
    unrelated = computed.per_image["5"]["BERT-Score"]
    assert exact == pytest.approx(1.0, abs=1e-4)
    assert unrelated < exact - 0.1
    assert computed.scores["BERT-Score"] == pytest.approx(
        sum(s["BERT-Score"] for s in computed.per_image.values()) / len(RESULTS), abs=1e-6)


@needs_java
def test_good_captions_beat_shuffled(computed: MetricsResult) -> None:
    def mean(ids: list[int], name: str) -> float:
        return sum(computed.per_image[str(i)][name] for i in ids) / len(ids)

    assert mean(GOOD_IDS, "CIDEr") > 1.0 > mean(SHUFFLED_IDS, "CIDEr")
    assert mean(GOOD_IDS, "METEOR") > mean(SHUFFLED_IDS, "METEOR")
    assert mean(GOOD_IDS, "BERT-Score") > mean(SHUFFLED_IDS, "BERT-Score")


def test_missing_java_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert java_available()[0] is False
    with pytest.raises(RuntimeError, match="default-jre-headless") as err:
        coco_metrics({"1": "a dog"}, {"1": ["a dog runs"]})
    assert "METEOR" in str(err.value) and "SPICE" in str(err.value)


def test_inputs_validated() -> None:
    with pytest.raises(ValueError, match="no references"):
        coco_metrics({"1": "a dog", "9": "a cat"}, {"1": ["a dog runs"]})
    with pytest.raises(ValueError, match="no results"):
        coco_metrics({}, {"1": ["a dog runs"]})


def _write(tmp_path: Path, obj: object, name: str = "f.json") -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_load_results_json(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"image_id": 42, "caption": "a dog", "score": 0.3}, {"image_id": "x", "caption": "b"}])
    assert load_results_json(path) == {"42": "a dog", "x": "b"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ({"image_id": 1, "caption": "a"}, "expected a JSON list"),
        ([], "empty"),
        ([{"image_id": 1}], "entry 0 must be an object with 'image_id' and 'caption'"),
        ([{"image_id": 1, "caption": 3}], "non-string caption"),
        ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}],
         r"duplicate image_id 1 \(entries 0 and 1\)"),
    ],
)
def test_load_results_json_errors(tmp_path: Path, content: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_results_json(_write(tmp_path, content))


def test_load_references_coco(tmp_path: Path) -> None:
    path = _write(tmp_path, {"images": [{"id": 1}], "annotations": [
        {"image_id": 1, "id": 1, "caption": "a"}, {"image_id": 1, "id": 2, "caption": "b"},
        {"image_id": 2, "id": 3, "caption": "c"}]})
    assert load_references_json(path) == {"1": ["a", "b"], "2": ["c"]}
    with pytest.raises(ValueError, match="Karpathy"):
        load_references_json(path, split="test")


def test_load_references_karpathy(tmp_path: Path) -> None:
    images = [
        {"filename": "COCO_val2014_000000000001.jpg", "split": "test",
         "sentences": [{"raw": "A dog."}, {"raw": "Dog"}]},
        {"filename": "COCO_val2014_000000000002.jpg", "split": "val", "sentences": [{"raw": "A cat."}]},
    ]
    path = _write(tmp_path, {"images": images, "dataset": "coco"})
    assert load_references_json(path) == {"COCO_val2014_000000000001": ["A dog.", "Dog"],
                                          "COCO_val2014_000000000002": ["A cat."]}
    assert load_references_json(path, split="test") == {"COCO_val2014_000000000001": ["A dog.", "Dog"]}
    with pytest.raises(ValueError, match="no references found for split 'train'"):
        load_references_json(path, split="train")
    with pytest.raises(ValueError, match="expected COCO annotations"):
        load_references_json(_write(tmp_path, [1, 2], "bad.json"))


def _tiny_clip(folder: Path) -> None:
    """A randomly initialised tiny CLIP with a byte-level BPE CLIPTokenizer built offline."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    merges = [("d", "o"), ("do", "g</w>"), ("p", "h"), ("o", "t")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)


def test_clip_score_tiny_random_model(tmp_path: Path) -> None:
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model_dir = tmp_path / "clip"
    _tiny_clip(model_dir)
    captions = {"1": "a dog on grass", "2": "a photo of a cat", "3": "two red buses"}
    images = {}
    for k, colour in zip(captions, ("red", "green", "blue")):
        images[k] = str(tmp_path / f"{k}.png")
        Image.new("RGB", (40, 48), colour).save(images[k])

    mean, values = metrics._clip_score(str(model_dir), list(captions), captions, images)

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    expected = []
    for k, caption in captions.items():
        with torch.no_grad():
            img = model.get_image_features(**processor(images=Image.open(images[k]).convert("RGB"),
                                                       return_tensors="pt"))
            txt = model.get_text_features(**processor(text=["A photo depicts " + caption], return_tensors="pt"))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = torch.nn.functional.cosine_similarity(img, txt).item()
        expected.append(2.5 * max(cos, 0.0))
    assert values == pytest.approx(expected, abs=1e-5)
    assert mean == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert all(0.0 <= v <= 2.5 for v in values) and 0.0 <= mean <= 2.5
    assert any(v > 0.0 for v in values)


def test_bert_score_disabled() -> None:
    with pytest.raises(metrics._Unavailable, match=r"disabled \(bert_score_model=None\)"):
        metrics._bert_score(None, ["1"], {"1": "a"}, {"1": ["a"]})


def test_clip_score_unavailable_reasons(tmp_path: Path) -> None:
    with pytest.raises(metrics._Unavailable, match=r"no CLIP weights supplied \(pass --clip-model\)"):
        metrics._clip_score(None, ["1"], {"1": "a"}, {"1": "x.png"})
    with pytest.raises(metrics._Unavailable, match="no images supplied"):
        metrics._clip_score(str(tmp_path), ["1"], {"1": "a"}, None)
    with pytest.raises(metrics._Unavailable, match="could not load CLIP model"):
        metrics._clip_score(str(tmp_path), ["1"], {"1": "a"}, {"1": "x.png"})
