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


def test_official_coco_captions_file(tmp_path):
    from ladic.data import load_captions

    data = {"info": {}, "images": [{"id": 391895, "file_name": "000000391895.jpg"}, {"id": 7, "file_name": "x.jpg"}],
            "annotations": [{"image_id": 391895, "id": 1, "caption": "A man riding a bike."},
                            {"image_id": 391895, "id": 2, "caption": "Someone on a bicycle"},
                            {"image_id": 7, "id": 3, "caption": None}]}
    recs = load_captions(_write(tmp_path / "captions_val2017.json", data), tmp_path / "val2017")
    assert recs == [CaptionRecord("391895", str(tmp_path / "val2017" / "000000391895.jpg"),
                                  ["a man riding a bike", "someone on a bicycle"], "val")]
    assert load_captions(_write(tmp_path / "captions.json", data), tmp_path, "train")[0].split == "train"


def test_pairs_files_jsonl_csv_and_img2dataset_keys(tmp_path):
    from ladic.data import load_captions, load_pairs

    lines = [{"image": "a.jpg", "caption": "A dog runs."}, {"image": "a.jpg", "caption": "a brown dog"},
             {"image": "b.jpg", "caption": 3}, {"image": "c.jpg", "caption": "   "}, {"image": "d.jpg", "caption": "A cat"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 2 of 5 rows .*\(rows 3, 4\)"):
        recs = load_captions(tmp_path / "pairs.jsonl", tmp_path / "img", "val")
    assert [(r.image_id, r.captions, r.split) for r in recs] == [("a", ["a dog runs", "a brown dog"], "val"),
                                                                ("d", ["a cat"], "val")]
    assert recs[0].image_path == str(tmp_path / "img" / "a.jpg")
    (tmp_path / "laion.csv").write_text('key,caption,url\n000001,"A red car, parked",http://x\n000002,a tree,http://y\n')
    recs = load_captions(tmp_path / "laion.csv", tmp_path)
    assert [(r.image_id, r.image_path, r.captions) for r in recs] == [
        ("000001", str(tmp_path / "000001.jpg"), ["a red car, parked"]), ("000002", str(tmp_path / "000002.jpg"), ["a tree"])]
    (tmp_path / "odd.csv").write_text("picture,words\np.jpg,a dog\n")
    with pytest.raises(ValueError, match="no image column"):
        load_pairs(tmp_path / "odd.csv", tmp_path)
    assert load_pairs(tmp_path / "odd.csv", tmp_path, image_column="picture", caption_column="words")[0].captions == ["a dog"]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_pairs(tmp_path / "bad.jsonl", tmp_path)


def test_training_reads_validation_from_another_file(tmp_path):
    """val_data: BLIP-style split files, training from one and validation from the other."""
    import numpy as np
    from PIL import Image

    from ladic import LaDiC, preset
    from ladic.train import ConfigError, TrainConfig, load_datasets

    rng = np.random.default_rng(0)
    for name in ("t1", "t2", "v1"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{name}.jpg")
    train = _write(tmp_path / "coco_karpathy_train.json", [{"image": "t1.jpg", "caption": "a red dog"},
                                                            {"image": "t2.jpg", "caption": "a blue cat"}])
    val = _write(tmp_path / "coco_karpathy_val.json", [{"image": "v1.jpg", "caption": ["a green bird", "a bird"]}])
    sets = ["preset=tiny", f"data={train}", f"val_data={val}", f"image_root={tmp_path}", "progress=false",
            f"cache_dir={tmp_path / 'cache'}", "stats_captions=10"]
    train_set, val_set, _ = load_datasets(TrainConfig.load(None, sets), LaDiC(preset("tiny")), progress=False)
    assert train_set.image_ids == ["t1", "t2"] and val_set.image_ids == ["v1"]
    assert val_set.references == {"v1": ["a green bird", "a bird"]}
    with pytest.raises(ConfigError, match="val_data goes with a caption file"):
        TrainConfig.load(None, ["data=flickr8k", f"val_data={val}"])
