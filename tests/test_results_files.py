"""Results files of ``ladic caption --out``: never silently replaced, never mixing two settings, unique image ids,
and readable by ``ladic eval --results`` as JSONL too."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ladic.collection import Photo, unique_image_ids
from ladic.metrics import load_results_json
from ladic.results_file import ResultsFileError, check_settings, settings_path, write_settings


def _ladic(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "ladic.cli", *map(str, argv)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=600, cwd=cwd)


def test_an_existing_results_file_is_refused_then_resumed_or_overwritten(tmp_path):
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b").mkdir()
    for sub, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (48, 48), colour).save(photos / sub / "x.jpg")
    Image.new("RGB", (48, 48), "green").save(photos / "a" / "y.jpg")
    out = tmp_path / "caps.jsonl"
    first = _ladic("caption", photos, "--recursive", "--out", out, "--no-progress", "--workers", "0")
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image_id"] for r in records) == ["a/x", "b/x", "y"]  # colliding stems get their folder
    saved = json.loads(settings_path(out).read_text())
    assert saved["model"].endswith("ladic-1step-flickr8k") and saved["seed"] == 0

    again = _ladic("caption", photos, "--recursive", "--out", out, "--no-progress")
    assert again.returncode == 2 and "already holds results" in again.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == records  # untouched
    other = _ladic("caption", photos, "--recursive", "--out", out, "--resume", "--seed", "3", "--no-progress")
    assert other.returncode == 2 and "seed=0" in other.stderr and "seed=3" in other.stderr
    full = _ladic("caption", photos, "--recursive", "--out", out, "--resume", "--full", "--no-progress")
    assert full.returncode == 2 and "ladic-small-flickr8k" in full.stderr
    same = _ladic("caption", photos, "--recursive", "--out", out, "--resume", "--no-progress", "--workers", "0")
    assert same.returncode == 0 and f"captioned 0, failed 0, 3 already in {out} in " in same.stderr
    both = _ladic("caption", photos, "--out", out, "--resume", "--overwrite")
    assert both.returncode == 2 and len(both.stderr.strip().splitlines()) == 1
    over = _ladic("caption", photos / "a", "--out", out, "--overwrite", "--seed", "3", "--no-progress", "--workers", "0")
    assert over.returncode == 0 and len(out.read_text().splitlines()) == 2
    assert json.loads(settings_path(out).read_text())["seed"] == 3

    # ladic eval --results reads the JSONL (scores against the Flickr8k references of these ids are not the point)
    assert load_results_json(out) == {r["image_id"]: r["caption"] for r in map(json.loads, out.read_text().splitlines())}


def test_check_settings_rules(tmp_path):
    out = tmp_path / "r.json"
    check_settings(out, {"seed": 0}, resume=False)  # nothing there yet
    out.write_text('[{"image_id": "x", "file": "x.jpg", "caption": "a dog"}]')
    with pytest.raises(ResultsFileError, match="--overwrite replaces it"):
        check_settings(out, {"seed": 0}, resume=False)
    check_settings(out, {"seed": 0}, resume=True)  # no sidecar: written before settings were recorded
    write_settings(out, {"seed": 0, "model": "m"})
    check_settings(out, {"model": "m", "seed": 0}, resume=True)
    with pytest.raises(ResultsFileError, match="model='m'"):
        check_settings(out, {"model": "other", "seed": 0}, resume=True)


def test_unique_image_ids():
    photos = [Photo.from_path(p) for p in ("/d/a/x.jpg", "/d/b/x.jpg", "/d/a/y.jpg", "/e/z.jpg", "/e/z.png")]
    assert [p.image_id for p in unique_image_ids(photos)] == ["a/x", "b/x", "y", "z.jpg", "z.png"]
    assert [p.file for p in unique_image_ids(photos)] == [p.file for p in photos]


def test_eval_reads_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"image_id": "1", "file": "1.jpg", "caption": "a dog"}\n{"image_id": "2", "file": "2.jpg", '
                    '"caption": "a cat"}\n{"image_id": "3", "fi')  # a torn last line is dropped
    assert load_results_json(path) == {"1": "a dog", "2": "a cat"}
    with pytest.raises(FileNotFoundError):
        load_results_json(tmp_path / "missing.jsonl")
    Path(tmp_path / "bad.jsonl").write_text('{"image_id": "1", "caption": 3}\n')
    with pytest.raises(ValueError, match="non-string caption"):
        load_results_json(tmp_path / "bad.jsonl")
