"""Options that lost their experiments left the library; configs saved before still load where they held them at
their no-op defaults, and any other value is refused in one line naming the option and commit 790f24f."""

import dataclasses
import json

import pytest

from ladic import LaDiC, preset
from ladic.captioner import default_model_path
from ladic.checkpoint import CheckpointError
from ladic.config import REMOVED_MODEL_OPTIONS, LaDiCConfig
from ladic.train import (
    REMOVED_TRAIN_OPTIONS,
    ConfigError,
    TrainConfig,
    checkpoint_model_config,
)


def test_the_shipped_student_names_removed_model_options_and_loads():
    saved = json.loads((default_model_path() / "config.json").read_text())["config"]
    assert {k: saved[k] for k in REMOVED_MODEL_OPTIONS} == REMOVED_MODEL_OPTIONS
    cfg = LaDiCConfig.from_dict(saved)
    assert cfg.timestep_sampling == "few_step" and cfg.infill_self_cond_prob == 0.2
    assert not set(REMOVED_MODEL_OPTIONS) & set(cfg.to_dict())


def test_a_saved_folder_with_a_removed_option_loads_at_its_default_only(tmp_path):
    LaDiC(preset("tiny")).save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "config": {**meta["config"], **REMOVED_MODEL_OPTIONS}}))
    assert LaDiC.from_pretrained(tmp_path / "old").config == LaDiCConfig.from_dict(meta["config"])
    for key, value in (("glancing_ratio", 0.5), ("timestep_sampling", "logit_normal")):
        path.write_text(json.dumps({**meta, "config": {**meta["config"], key: value}}))
        with pytest.raises(CheckpointError, match=f"{key}={value!r}.*left the library; `git show 790f24f`"):
            LaDiC.from_pretrained(tmp_path / "old")


def test_an_old_training_checkpoint_and_config_file_load_at_the_defaults(tmp_path):
    old = {**dataclasses.asdict(TrainConfig(preset="tiny")), **REMOVED_TRAIN_OPTIONS,
           "model": {"glancing_ratio": 0.0}}
    assert TrainConfig.from_saved(old) == TrainConfig(preset="tiny")
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert TrainConfig.load(tmp_path / "old.json") == TrainConfig(preset="tiny")
    with pytest.raises(ConfigError, match="^flip_augment=True: .*`git show 790f24f` has it$"):
        TrainConfig.from_saved({**old, "flip_augment": True})
    with pytest.raises(ConfigError, match="^model.glancing_ratio=0.5: "):
        TrainConfig.load(None, ["model.glancing_ratio=0.5"])
    (tmp_path / "model_config.json").write_text(json.dumps({**preset("tiny").to_dict(), "glancing_ratio": 0.5}))
    with pytest.raises(CheckpointError, match="glancing_ratio=0.5"):
        checkpoint_model_config(tmp_path, TrainConfig(preset="tiny"))
