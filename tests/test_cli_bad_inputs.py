"""``ladic caption`` / ``ladic infill`` on bad input, run in-process through ``ladic.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_fixtures import jpeg_bytes, png_with_header_size

from ladic.cli import main
from ladic.image_io import load_image


@pytest.fixture(scope="session")
def model_dir(tiny_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model.save_pretrained(path)
    return str(path)


def _photo(size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))






def make_mixed_folder(root: Path) -> tuple[list[str], dict[str, str], Path]:
    """Good images, bad images and a non-image; returns (good files, {bad file: reason}, skipped file)."""
    root.mkdir()
    photo = _photo()
    photo.save(root / "photo.png")
    (root / "photo_b.jpg").write_bytes(jpeg_bytes(photo, quality=90))
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(root / "alpha.png")
    photo.convert("L").save(root / "gray.png")
    photo.convert("CMYK").save(root / "cmyk.jpg", format="JPEG")
    Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21)).save(root / "sixteen.png")
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("RGB", (1, 1), "white").save(root / "one.png")

    jpeg = jpeg_bytes(_photo((256, 256)), quality=90)
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "huge.png").write_bytes(png_with_header_size(12000, 12000))
    (root / "notes.txt").write_text("not an image at all\n")

    good = ["alpha.png", "anim.gif", "cmyk.jpg", "gray.png", "one.png", "photo.png", "photo_b.jpg", "sixteen.png"]
    bad = {
        "corrupt.jpg": "not an image (cannot identify image file)",  # JPEG magic, garbage after it
        "huge.png": "image too large (12000x12000 = 144.0 MP > 64.0 MP limit)",
        "text.jpg": "not an image (cannot identify image file)",
        "truncated.jpg": "truncated or corrupt image data",
        "zero.jpg": "empty file (0 bytes)",
    }
    return [str(root / f) for f in good], {str(root / f): r for f, r in bad.items()}, root / "notes.txt"


def test_the_fixture_images_are_what_they_claim(tmp_path):
    good, bad, _ = make_mixed_folder(tmp_path / "mixed")
    assert {Image.open(f).mode for f in good} >= {"RGBA", "L", "CMYK", "I;16", "RGB", "P"}
    assert all(load_image(f).mode == "RGB" for f in good)
    assert Image.open(Path(good[1])).n_frames == 3  # anim.gif


def test_caption_mixed_folder(model_dir, tmp_path, capsys):
    good, bad, skipped = make_mixed_folder(tmp_path / "mixed")
    missing = str(tmp_path / "missing.jpg")
    out_json = tmp_path / "results.json"
    code = main(["caption", str(tmp_path / "mixed"), missing, "--model", model_dir, "--steps", "2",
                 "--out", str(out_json)])
    captured = capsys.readouterr()
    assert code == 1

    # every good image is captioned, one `path\tcaption` line each, in order
    lines = captured.out.splitlines()
    assert [line.split("\t")[0] for line in lines] == good
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1].strip() for line in lines)

    # every bad item: exactly one `error: <file>: <reason>` line; the non-image is a note
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    expected = {f"error: {f}: {reason}" for f, reason in bad.items()} | {f"error: {missing}: file not found"}
    assert sorted(errors) == sorted(expected)
    for f in [*bad, missing]:
        assert sum(f"{f}:" in line for line in captured.err.splitlines()) == 1
    notes = [line for line in captured.err.splitlines() if str(skipped) in line]
    assert notes == [f"note: {skipped}: skipped: not an image file (extension '.txt')"]
    assert f"{len(bad) + 1} of {len(bad) + 1 + len(good)} inputs failed" in captured.err
    assert f"captioned {len(good)}, failed {len(bad) + 1}, 1 not image files (see the notes) in " in captured.err
    assert "Traceback" not in captured.err

    results = json.loads(out_json.read_text())
    assert [r["file"] for r in results] == good
    assert [r["image_id"] for r in results] == [Path(f).stem for f in good]
    assert [f"{r['file']}\t{r['caption']}" for r in results] == lines


def test_caption_all_good_exits_0_and_text_given_directly_is_an_error(model_dir, tmp_path, capsys):
    good, _, _ = make_mixed_folder(tmp_path / "mixed")
    notes = tmp_path / "mixed" / "notes.txt"
    code = main(["caption", good[5], good[6], "--model", model_dir, "--steps", "2"])
    captured = capsys.readouterr()
    assert code == 0 and len(captured.out.splitlines()) == 2
    assert not [line for line in captured.err.splitlines() if line.startswith("error")]

    # a non-image file named on the command line is an error (not a skip note), exit 1
    code = main(["caption", good[5], str(notes), "--model", model_dir, "--steps", "2"])
    captured = capsys.readouterr()
    assert code == 1 and len(captured.out.splitlines()) == 1
    assert f"error: {notes}: not an image (cannot identify image file)" in captured.err.splitlines()


@pytest.mark.parametrize("template", ["", "   ", "\t"])
def test_infill_blank_template_exits_2(model_dir, tmp_path, capsys, template):
    img = tmp_path / "photo.png"
    _photo().save(img)
    code = main(["infill", str(img), template, "--model", model_dir, "--steps", "2"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    err = captured.err.strip().splitlines()
    assert err == ["error: infill template must contain text and at least one blank ('___' or '[MASK]')"]


def test_infill_bad_image_exits_1(model_dir, tmp_path, capsys):
    bad = tmp_path / "text.jpg"
    bad.write_text("hello")
    assert main(["infill", str(bad), "a ___ dog", "--model", model_dir]) == 1
    assert capsys.readouterr().err.strip() == f"error: {bad}: not an image (cannot identify image file)"


@pytest.mark.parametrize("damage", ["bad-config", "bad-weights", "empty-folder"])
def test_corrupt_checkpoint_gives_one_line_error(model_dir, tmp_path, capsys, damage):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if damage == "bad-config":
        (ckpt / "config.json").write_text("{not json")
        (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
        needle = "config.json: corrupt"
    elif damage == "bad-weights":
        (ckpt / "config.json").write_text((Path(model_dir) / "config.json").read_text())
        (ckpt / "model.safetensors").write_bytes((Path(model_dir) / "model.safetensors").read_bytes()[:500])
        needle = "model.safetensors: corrupt weights file"
    else:
        needle = "(needs config.json"
    img = tmp_path / "photo.png"
    _photo().save(img)
    code = main(["caption", str(img), "--model", str(ckpt)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {ckpt}") and needle in err[0], err
    assert "Traceback" not in captured.err


def test_rerank_needs_candidates(model_dir, tmp_path, capsys):
    from ladic import preset
    from ladic.baselines import ARCaptioner

    path = tmp_path / "photo.png"
    _photo().save(path)
    assert main(["caption", str(path), "--model", model_dir, "--rerank"]) == 2
    assert "--mbr K with K >= 2" in capsys.readouterr().err
    ARCaptioner(preset("tiny")).save_pretrained(tmp_path / "ar")
    assert main(["caption", str(path), "--model", model_dir, "--mbr", "3", "--rerank", "--rerank-model", str(tmp_path / "ar")]) == 0
    out = capsys.readouterr().out.strip().split("\t")
    assert out[0] == str(path) and out[1]
