import json
from pathlib import Path

import pytest

from ladic.data import (
    CaptionRecord,
    flickr8k_root,
    load_karpathy,
    load_paragraphs,
    pre_caption,
    pre_paragraph,
    require_flickr8k,
)


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _sentence(raw: str) -> dict:
    return {"raw": raw, "tokens": raw.lower().split(), "imgid": 0, "sentid": 0}


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A dog runs.", "a dog runs"),
        ("A black dog runs after a white dog in the snow .", "a black dog runs after a white dog in the snow"),
        ('Two "happy" kids (outside)!', "two happy kids outside"),
        ("Wait: it's a man; with a hat*#~", "wait it's a man with a hat"),
        ("  Lots   of    spaces  ", "lots of spaces"),
        ("Commas, hyphens - and question? stay", "commas, hyphens - and question? stay"),
        ("trailing newline.\n", "trailing newline"),
        ("", ""),
        ("...", ""),
    ],
)
def test_pre_caption_matches_blip(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_quirks_and_truncation():
    assert pre_caption("a\tb") == "a\tb"  # BLIP only collapses runs of 2+ whitespace
    assert pre_caption("a\nb") == "a\nb"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("one two", max_words=2) == "one two"


def test_pre_paragraph_keeps_sentences():
    text = "A man sits on a bench.  He wears a (red) hat!Is it sunny? Yes..."
    assert pre_paragraph(text) == "a man sits on a bench. he wears a red hat. is it sunny. yes."
    assert pre_paragraph(text, max_words=8) == "a man sits on a bench. he wears."
    assert pre_paragraph("no final period") == "no final period."
    assert pre_paragraph(" . ! ") == ""


def _karpathy_image(filename, split, raws, **extra):
    return {"filename": filename, "split": split, "sentences": [_sentence(r) for r in raws], **extra}


def test_karpathy_flickr(tmp_path):
    data = {
        "dataset": "flickr8k",
        "images": [
            _karpathy_image("100_a.jpg", "train", ["A dog.", "A brown dog !"], imgid=0),
            _karpathy_image("200_b.jpg", "restval", ["A cat."], imgid=1),
            _karpathy_image("300_c.jpg", "val", ["A bird.", "..."], imgid=2),
            _karpathy_image("400_d.jpg", "test", ["A fish."], imgid=3),
        ],
    }
    path = _write(tmp_path / "dataset_flickr8k.json", data)
    records = load_karpathy(path, tmp_path / "images")
    assert [r.image_id for r in records] == ["100_a", "200_b", "300_c", "400_d"]
    first = CaptionRecord("100_a", str(tmp_path / "images" / "100_a.jpg"), ["a dog", "a brown dog"], "train")
    assert records[0] == first
    assert records[1].split == "train"  # restval counts as train
    assert records[2].captions == ["a bird"]  # captions empty after cleaning are dropped
    assert [r.image_id for r in load_karpathy(path, tmp_path, split="train")] == ["100_a", "200_b"]
    assert [r.image_id for r in load_karpathy(path, tmp_path, split="test")] == ["400_d"]


def test_karpathy_coco_uses_filepath_and_cocoid(tmp_path):
    data = {
        "images": [
            _karpathy_image(
                "COCO_val2014_000000391895.jpg", "restval", ["A man riding a bike."], filepath="val2014", cocoid=391895
            ),
            _karpathy_image(
                "COCO_train2014_000000000009.jpg", "test", ["Food on a plate."], filepath="train2014", cocoid=9
            ),
        ]
    }
    path = _write(tmp_path / "dataset_coco.json", data)
    train = load_karpathy(path, "/coco", split="train")
    assert train == [
        CaptionRecord("391895", "/coco/val2014/COCO_val2014_000000391895.jpg", ["a man riding a bike"], "train")
    ]
    assert load_karpathy(path, "/coco", split="test")[0].image_path == "/coco/train2014/COCO_train2014_000000000009.jpg"


def test_blip_train_groups_captions_by_image(tmp_path):
    data = [
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": "A man on a bike.", "image_id": "coco_391895"},
        {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "Food!", "image_id": "coco_9"},
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": "A cyclist.", "image_id": "coco_391895"},
    ]
    path = _write(tmp_path / "coco_karpathy_train.json", data)
    records = load_karpathy(path, "/coco")
    assert records == [
        CaptionRecord(
            "391895", "/coco/val2014/COCO_val2014_000000391895.jpg", ["a man on a bike", "a cyclist"], "train"
        ),
        CaptionRecord("9", "/coco/train2014/COCO_train2014_000000000009.jpg", ["food"], "train"),
    ]
    assert load_karpathy(path, "/coco", split="train") == records
    with pytest.raises(ValueError, match="'val' not in"):
        load_karpathy(path, "/coco", split="val")


def test_blip_val_lists(tmp_path):
    data = [
        {"image": "val2014/COCO_val2014_000000184613.jpg", "caption": ["A child.", "A kid holding an umbrella"]},
        {"image": "flickr30k-images/1000092795.jpg", "caption": ["Two men."]},
    ]
    path = _write(tmp_path / "coco_karpathy_val.json", data)
    records = load_karpathy(path, tmp_path, split="val")
    assert [r.image_id for r in records] == ["184613", "1000092795"]
    assert records[0].captions == ["a child", "a kid holding an umbrella"]
    assert {r.split for r in records} == {"val"}
    unnamed = _write(tmp_path / "captions.json", data)
    assert load_karpathy(unnamed, tmp_path)[0].split == "val"
    assert load_karpathy(unnamed, tmp_path, split="test")[0].split == "test"


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_karpathy(tmp_path / "nope.json", tmp_path)
    for bad in ({"foo": 1}, [], [{"file": "x.jpg"}], [{"image": "x.jpg", "caption": 3}], 7):
        path = _write(tmp_path / "bad.json", bad)
        with pytest.raises(ValueError, match="unrecognised caption file format"):
            load_karpathy(path, tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_karpathy(broken, tmp_path)
    path = _write(tmp_path / "dataset_flickr8k.json", {"images": [_karpathy_image("1.jpg", "restval", ["a"])]})
    with pytest.raises(ValueError, match="available: \\['train'\\]"):
        load_karpathy(path, tmp_path, split="test")
    with pytest.raises(ValueError, match="restval"):
        load_karpathy(path, tmp_path, split="restval")


def _paragraph_files(tmp_path):
    paragraphs = [
        {
            "image_id": 2356347,
            "url": "https://x/2356347.jpg",
            "paragraph": "A large building. It has a clock!  Cars park outside.",
        },
        {"image_id": 7, "url": "https://x/7.jpg", "paragraph": "Two dogs (brown) play; one runs."},
        {"image_id": 8, "url": "https://x/8.jpg", "paragraph": "Unused."},
    ]
    return _write(tmp_path / "paragraphs_v1.json", paragraphs), _write(tmp_path / "test_split.json", [7, 2356347])


def test_load_paragraphs(tmp_path):
    paragraphs, split = _paragraph_files(tmp_path)
    records = load_paragraphs(paragraphs, split, tmp_path / "imgs", "test")
    assert records == [
        CaptionRecord("7", str(tmp_path / "imgs" / "7.jpg"), ["two dogs brown play one runs."], "test"),
        CaptionRecord(
            "2356347",
            str(tmp_path / "imgs" / "2356347.jpg"),
            ["a large building. it has a clock. cars park outside."],
            "test",
        ),
    ]


def test_load_paragraphs_errors(tmp_path):
    paragraphs, split = _paragraph_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="val_split.json"):
        load_paragraphs(paragraphs, tmp_path / "val_split.json", tmp_path, "val")
    missing = _write(tmp_path / "val_split.json", [7, 99])
    with pytest.raises(ValueError, match="1 image ids"):
        load_paragraphs(paragraphs, missing, tmp_path, "val")
    not_ints = _write(tmp_path / "bad_split.json", {"ids": [7]})
    with pytest.raises(ValueError, match="list of integer"):
        load_paragraphs(paragraphs, not_ints, tmp_path, "val")
    bad = _write(tmp_path / "bad_paragraphs.json", [{"id": 7}])
    with pytest.raises(ValueError, match="image_id"):
        load_paragraphs(bad, split, tmp_path, "val")


def test_flickr8k_root_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("LADIC_DATA", raising=False)
    assert flickr8k_root(tmp_path / "repo") == (tmp_path / "shared" / "data" / "flickr8k").resolve()
    repo = Path(__file__).resolve().parents[1]
    assert flickr8k_root() == (repo.parent / "shared" / "data" / "flickr8k").resolve()
    monkeypatch.setenv("LADIC_DATA", str(tmp_path / "elsewhere"))
    assert flickr8k_root() == tmp_path / "elsewhere" / "flickr8k"
    with pytest.raises(FileNotFoundError, match="LADIC_DATA"):
        require_flickr8k()


def test_flickr8k_real_data():
    try:
        root = require_flickr8k()
    except FileNotFoundError as e:
        pytest.skip(f"real Flickr8k data absent: {e}")
    records = load_karpathy(root / "captions.json", root / "images")
    train = [r for r in records if r.split == "train"]
    val = load_karpathy(root / "captions.json", root / "images", split="val")
    assert (len(train), len(val), len(records)) == (6000, 1000, 7000)
    assert all(len(r.captions) == 5 for r in records)
    assert len({r.image_id for r in records}) == 7000
    for r in train[:3] + val[:3]:
        assert Path(r.image_path).is_file()
        assert all(c == pre_caption(c) and c for c in r.captions)


def test_consensus_reference_is_the_one_the_others_agree_with():
    from ladic.data.captions import consensus_index

    refs = [
        ["a man rides a red bike", "a cat sleeps", "a man is riding a red bike down the street", "a man rides a bike",
         "a man on a red bike rides"],
        ["two dogs play in the snow", "two dogs are playing in snow", "dogs in the snow", "a bowl of soup"],
        ["only one"],
    ]
    best = consensus_index(refs)
    assert best[2] == 0
    assert refs[0][best[0]] != "a cat sleeps" and refs[1][best[1]] != "a bowl of soup"
    assert best[1] in (0, 1)


def test_training_on_consensus_references(tmp_path):
    from ladic import LaDiC, preset
    from ladic.train import TrainConfig, load_datasets

    common = ["preset=tiny", "data=scenes", "num_scenes=16", "scene_size=32", "val_images=0", "progress=false"]
    model = LaDiC(preset("tiny"))
    full, _, _ = load_datasets(TrainConfig.load(None, common), model, progress=False)
    one, _, _ = load_datasets(TrainConfig.load(None, common + ["references=consensus"]), model, progress=False)
    assert len(one) == 16 and one.caption_image.tolist() == list(range(16)) and len(full) > 16
    assert all(len(v) == 1 and v[0] in full.references[k] for k, v in one.references.items())
    with pytest.raises(ValueError, match="references"):
        load_datasets(TrainConfig.load(None, common + ["references=best"]), model, progress=False)
    # a reward scores against every human caption, the mirrored photos' too, whatever the training targets
    scored, _, _ = load_datasets(TrainConfig.load(None, common + ["references=consensus", "flip_augment=true",
                                                                  "reward_weight=1"]), model, progress=False)
    from ladic.data.captions import mirror_caption

    assert len(scored) == 32 and {k: v for k, v in scored.references.items() if "#" not in k} == full.references
    assert all(scored.references[f"{k}#flip"] == [mirror_caption(c) for c in v] for k, v in full.references.items())
