"""Hub ids in ``from_pretrained`` / ``load_model`` / ``--model``, offline: the tests build the Hub cache layout on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ladic.captioner import CheckpointError, LaDiC
from ladic.cli import main
from ladic.models import load_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "org/name" must not exist as a relative folder
    return cache


def publish_to_cache(model_dir: Path, cache: Path, repo_id: str) -> Path:
    """What ``snapshot_download`` leaves behind: models--org--name/snapshots/<rev>/... and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def saved_model(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-hub-model")
    tiny_model.save_pretrained(path)
    return path


def test_from_pretrained_resolves_a_cached_hub_id(tiny_model, saved_model, hub_cache, scenes):
    publish_to_cache(saved_model, hub_cache, "someone/tiny-ladic")
    loaded = LaDiC.from_pretrained("someone/tiny-ladic")
    images = [s.image for s in scenes[:2]]
    assert loaded.caption(images, seed=1) == tiny_model.caption(images, seed=1)
    assert type(load_model("someone/tiny-ladic")) is LaDiC


def test_a_local_folder_wins_over_a_hub_id(saved_model, hub_cache):
    (hub_cache.parent / "someone").mkdir()
    shutil.copytree(saved_model, hub_cache.parent / "someone" / "tiny-ladic")  # relative folder, same name
    assert isinstance(LaDiC.from_pretrained("someone/tiny-ladic"), LaDiC)  # nothing in the cache: the folder was used


@pytest.mark.parametrize("name", ["someone/missing-model", "missing-model"])
def test_neither_folder_nor_hub_model_is_one_line_naming_both(hub_cache, name):
    with pytest.raises(CheckpointError) as err:
        LaDiC.from_pretrained(name)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name}: ")
    assert "local model folder" in message and "Hugging Face Hub" in message


@pytest.mark.parametrize("name", ["no/such/folder", "./not-here", "/abs/not-here"])
def test_a_name_that_cannot_be_a_hub_id_is_a_missing_folder(hub_cache, name):
    with pytest.raises(CheckpointError, match="no such local model folder"):
        LaDiC.from_pretrained(name)


def test_cli_model_accepts_a_hub_id(saved_model, hub_cache, scenes, capsys):
    publish_to_cache(saved_model, hub_cache, "someone/tiny-ladic")
    photo = hub_cache.parent / "scene.png"
    scenes[0].image.save(photo)
    assert main(["caption", str(photo), "--model", "someone/tiny-ladic", "--steps", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{photo}\t")
    assert main(["caption", str(photo), "--model", "someone/missing-model", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: someone/missing-model: no such local model folder, and not a model on the Hugging Face Hub "
                   "(not in the local Hugging Face cache and HF_HUB_OFFLINE is set)"]
