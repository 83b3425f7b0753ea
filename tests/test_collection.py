"""Captioning a collection: streaming order, per-photo noise, bad files mid-stream, JSONL, resume, shard merge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ladic.cli import main
from ladic.collection import CollectionConfig, Photo, caption_files, shard
from ladic.image_io import load_image
from ladic.results_file import ResultsFileError, ResultsStore, read_jsonl, read_records

STEPS = ["--steps", "2"]


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model.save_pretrained(path)
    return str(path)


@pytest.fixture
def folder(scenes, tmp_path) -> tuple[Path, list[str], dict[str, str]]:
    """Six good photos (PNG and JPEG) with a corrupt file and an empty file in the middle of the stream."""
    root = tmp_path / "photos"
    root.mkdir()
    for i, s in enumerate(scenes):
        s.image.resize((96, 96)).save(root / f"p{i}.{'png' if i % 2 else 'jpg'}")
    (root / "p2_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (root / "p4_empty.png").write_bytes(b"")
    files = sorted(str(p) for p in root.iterdir())
    bad = {str(root / "p2_broken.jpg"): "not an image (cannot identify image file)",
           str(root / "p4_empty.png"): "empty file (0 bytes)"}
    return root, files, bad


def test_jpeg_draft_decoding_keeps_both_sides_at_least_the_asked_size(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    photo.save(tmp_path / "big.jpg", quality=90)
    photo.save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.jpg", draft_size=64).size == (128, 96)  # 1/8: both sides still >= 64
    assert load_image(tmp_path / "big.jpg", draft_size=300).size == (512, 384)  # 1/2
    assert load_image(tmp_path / "big.jpg").size == (1024, 768)
    assert load_image(tmp_path / "big.png", draft_size=64).size == (1024, 768)  # not a JPEG: full size


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_caption_depends_on_the_photo_and_seed_only(tiny_model, folder):
    """Batch size, order, streaming and the API used cannot change a photo's caption."""
    _, files, bad = folder
    good = [f for f in files if f not in bad]
    kwargs = dict(num_inference_steps=2, seed=3, back_and_refine=True, mbr_candidates=2)

    def captions(photos, batch_size, workers=0):
        config = CollectionConfig(batch_size=batch_size, num_workers=workers)
        return {r.photo.file: r.caption for r in caption_files(tiny_model, photos, config=config, **kwargs)}

    reference = captions(good, batch_size=len(good))
    assert len(set(reference.values())) > 1
    assert captions(good, batch_size=1) == reference
    assert captions(good[::-1], batch_size=4, workers=2) == reference
    assert {f: captions([f], batch_size=1)[f] for f in good[:2]} == {f: reference[f] for f in good[:2]}
    # the in-memory API draws the same per-photo noise for the same pixels (these photos are too small for drafts)
    images = [load_image(f) for f in good]
    alone = [tiny_model.caption(im, **kwargs)[0] for im in images[:3]]
    together = tiny_model.caption(images, **kwargs)
    backwards = tiny_model.caption(images[::-1], batch_size=2, **kwargs)[::-1]
    assert together == backwards == list(reference.values()) and alone == together[:3]
    assert captions(good, batch_size=3) != {f: c for f, c in zip(good, tiny_model.caption(images, seed=4))}


def test_stream_keeps_input_order_and_reports_bad_files_in_place(tiny_model, folder):
    _, files, bad = folder
    stream = caption_files(tiny_model, files, config=CollectionConfig(batch_size=3, num_workers=1),
                           num_inference_steps=2)
    first = next(stream)  # results come before the whole collection is done
    results = [first, *stream]
    assert [r.index for r in results] == list(range(len(files)))
    assert [r.photo.file for r in results] == files
    for r in results:
        if r.photo.file in bad:
            assert r.caption is None and r.error == f"{r.photo.file}: {bad[r.photo.file]}"
        else:
            assert r.error is None and r.caption


def test_cli_jsonl_streams_one_object_per_photo(model_dir, folder, tmp_path, capsys):
    root, files, bad = folder
    out = tmp_path / "captions.jsonl"
    code = main(["caption", str(root), "--model", model_dir, *STEPS, "--batch-size", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    good = [f for f in files if f not in bad]
    assert [r["file"] for r in records] == good
    assert all(set(r) == {"image_id", "file", "caption"} and r["caption"] for r in records)
    assert [r["image_id"] for r in records] == [Path(f).stem for f in good]
    assert captured.out.splitlines() == [f"{r['file']}\t{r['caption']}" for r in records]
    errors = sorted(line for line in captured.err.splitlines() if line.startswith("error: "))
    assert errors == sorted(f"error: {f}: {reason}" for f, reason in bad.items())
    assert f"captioned {len(good)}, failed {len(bad)} in " in captured.err  # nothing to resume, no left-out files
    assert not list(tmp_path.glob("captions.jsonl.part-*"))


def test_resume_after_a_kill_equals_an_uninterrupted_run(model_dir, folder, tmp_path, capsys):
    root, files, bad = folder
    args = ["caption", str(root), "--model", model_dir, *STEPS, "--batch-size", "2"]
    full = tmp_path / "full.jsonl"
    assert main([*args, "--out", str(full)]) == 1
    reference = full.read_bytes()
    lines = reference.splitlines(keepends=True)

    # a kill -9 mid-write: two complete lines, then a torn third one
    killed = tmp_path / "killed.jsonl"
    killed.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    assert read_jsonl(killed)[0] == [json.loads(line) for line in lines[:2]]
    capsys.readouterr()
    assert main([*args, "--out", str(killed), "--resume"]) == 1
    err = capsys.readouterr().err
    assert killed.read_bytes() == reference  # no duplicate, no missing photo, same order
    assert f"captioned {len(lines) - 2}, failed {len(bad)}, 2 already in {killed} in " in err

    # resuming a finished run captions nothing and changes nothing
    assert main([*args, "--out", str(killed), "--resume"]) == 1
    assert killed.read_bytes() == reference
    assert f"captioned 0, failed {len(bad)}, {len(lines)} already in {killed} in " in capsys.readouterr().err

    # a COCO .json output resumes from the working file a killed run left behind
    coco = tmp_path / "results.json"
    (tmp_path / "results.json.part-0-of-1.jsonl").write_bytes(b"".join(lines[:3]) + b'{"image_id": "p')
    assert main([*args, "--out", str(coco), "--resume"]) == 1
    assert json.loads(coco.read_text()) == [json.loads(line) for line in lines]
    assert not list(tmp_path.glob("results.json.part-*"))


def test_a_damaged_line_before_the_end_is_refused(tmp_path):
    f = tmp_path / "captions.jsonl"
    f.write_text('{"file": "a", "caption": "x"}\nnot json\n{"file": "b", "caption": "y"}\n')
    with pytest.raises(ResultsFileError, match="line 2"):
        read_records(f)
    f.write_text('{"file": "a", "caption": "x"}\n{"file": "b", "capt\n')  # damaged last line: dropped
    assert read_jsonl(f) == ([{"file": "a", "caption": "x"}], len('{"file": "a", "caption": "x"}\n'))


def test_shards_merge_to_the_one_process_output(tiny_model, folder, tmp_path):
    """What each torchrun rank does (its shard, its part file), then rank 0's merge."""
    _, files, bad = folder
    photos = [Photo.from_path(f) for f in files]
    order = {p.file: i for i, p in enumerate(photos)}
    config = CollectionConfig(batch_size=2, num_workers=0)

    def run(out: Path, world: int, kill_rank_after: int | None = None, resume: bool = False) -> None:
        stores = [ResultsStore(out, rank, world) for rank in range(world)]
        done = [s.done(resume) for s in stores]
        for rank, store in enumerate(stores):
            store.open(resume)
            todo = [p for p in shard(photos, rank, world) if p.file not in done[rank]]
            for i, r in enumerate(caption_files(tiny_model, todo, config=config, num_inference_steps=2, seed=1)):
                if r.error is None:
                    store.append([r.record()])
                if rank == kill_rank_after and i == 1:
                    store.close()
                    return  # killed: no merge
            store.close()
        stores[0].finalize(order, resume)

    one = tmp_path / "one.jsonl"
    run(one, world=1)
    assert len(read_records(one)) == len(files) - len(bad)
    for world in (2, 3):
        many = tmp_path / f"many{world}.jsonl"
        run(many, world=world)
        assert many.read_bytes() == one.read_bytes()
        assert not list(tmp_path.glob(f"many{world}.jsonl.part-*"))
    # a 2-process run killed midway, resumed with 2 processes, then with 1 process from a 3-process wreck
    resumed = tmp_path / "resumed.jsonl"
    run(resumed, world=2, kill_rank_after=1)
    assert not resumed.exists() and list(tmp_path.glob("resumed.jsonl.part-*"))
    run(resumed, world=2, resume=True)
    assert resumed.read_bytes() == one.read_bytes()
    wreck = tmp_path / "wreck.json"
    run(wreck, world=3, kill_rank_after=0)
    run(wreck, world=1, resume=True)
    assert json.loads(wreck.read_text()) == read_records(one)
    assert not list(tmp_path.glob("wreck.json.part-*"))
