"""Bad invocations of every command (caption, infill, eval, demo, export, train): one ``error:`` line and exit code 2,
before or right after the model loads, never a traceback."""

import importlib.util
import subprocess
import sys

import pytest

BAD = [
    (["caption", "X", "--steps", "0"], "--steps must be >= 1"),
    (["caption", "X", "--mbr", "0"], "--mbr must be >= 1"),
    (["caption", "X", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["caption", "X", "--workers", "-1"], "--workers must be >= 0"),
    (["caption", "X", "--length", "0"], "--length must be >= 1"),
    (["caption", "X", "--guidance", "-1"], "--guidance must be >= 0"),
    (["caption", "X", "--device", "cuda"], "no CUDA device"),
    (["caption", "X", "--device", "gpu7"], "not a device"),
    (["infill", "X", "a ___ dog", "--steps", "0"], "--steps must be >= 1"),
    (["eval", "--limit", "0"], "--limit must be >= 1"),
    (["eval", "--results", "/no/such.json"], "/no/such.json: file not found"),
    (["eval", "--results", "BADJSON"], "not valid JSON"),
    (["eval", "--set", "hidden_size=3"], "--set hidden_size: not a sampling setting"),
    (["caption", "X", "--model", "someone/some-model"], "no such local model folder"),
    (["infill", "X", "a ___ dog", "--model", "someone/some-model"], "no such local model folder"),
    (["caption", "X", "--model", "/no/such/folder"], "/no/such/folder: no such local model folder"),
    (["demo", "--port", "70000"], "--port must be in 0..65535"),
    (["demo", "--max-request-seconds", "0"], "--max-request-seconds must be a positive number"),
    (["demo", "--max-request-seconds", "nan"], "--max-request-seconds must be a positive number"),
    (["demo", "--device", "cuda"], "no CUDA device"),
    (["demo", "--model", "/no/such/folder"], "no such local model folder"),
    (["export", "/no/such/folder", "OUT"], "/no/such/folder: no such folder"),
    (["export", "EMPTY", "OUT"], "neither a model folder (config.json) nor a training checkpoint"),
    (["export", "EMPTY", "OUT", "--restrict-vocab", "nope"], "--restrict-vocab nope: not 'flickr8k'"),
    (["train", "--config", "/no/such.json"], "/no/such.json: cannot read the config file"),
    (["train", "--config", "BADJSON"], "not valid JSON"),
    (["train", "--set", "stepz=5"], "unknown training option stepz"),
    (["train", "--set", "max_step=5"], "unknown training option max_step (did you mean max_steps?)"),
    (["train", "--set", "model.num_layer=2"], "unknown model option model.num_layer (did you mean model.num_layers?)"),
    (["train", "--set", "lr=fast"], "lr must be float, got 'fast'"),
    (["train", "--set", "restrict_vocab=3"], "restrict_vocab must be bool, got 3"),
    (["train", "--set", "flip_augment=true"], "flip_augment=True: the option lost its experiment and left the library"),
    (["train", "--set", "model.glancing_ratio=0.5"], "model.glancing_ratio=0.5: the option lost its experiment"),
    (["train", "--set", "batch_size=0"], "batch_size must be >= 1, got 0"),
    (["train", "--set", "model.beta_schedule=steep"], "model: unknown beta_schedule 'steep'"),
    (["train", "--set", "model.timestep_sampling=logit_normal"], "model: timestep_sampling='logit_normal': the value lost"),
    (["train", "--set", "preset=huge"], "unknown preset 'huge'"),
    (["train", "--set", "references=some"], "references must be one of all, consensus"),
    (["train", "--set", "data=/no/such.json"], "not 'flickr8k', 'scenes', a caption file (JSON, JSONL or CSV) or webdataset shards"),
    (["train", "--set", "init_from=EMPTY"], "not a model folder (no config.json there)"),
    (["train", "--set", "oops"], "override 'oops' is not key=value"),
    (["train", "--set", "model.image_encoder=nope"], "unknown image encoder 'nope'"),
    pytest.param(["train", "--set", "tensorboard=true"], "tensorboard=true needs the tensorboard package",
                 marks=pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None,
                                          reason="tensorboard is installed here")),
    (["train", "--set", "model.image_encoder=hf:someone/no-such-tower", "--out-dir", "OUT"],
     "image encoder hf:someone/no-such-tower: not a local folder, and not loadable"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join((b.values if hasattr(b, "values") else b)[0]) for b in BAD])
def test_bad_option_is_one_line(argv, message, tmp_path):
    photo = tmp_path / "x.jpg"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(photo)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text('{"lr": 1')
    named = {"X": photo, "EMPTY": tmp_path / "empty", "OUT": tmp_path / "out", "BADJSON": tmp_path / "bad.json"}
    argv = [a.replace("EMPTY", str(named["EMPTY"])) if a.startswith("init_from=") else str(named.get(a, a)) for a in argv]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "ladic.cli", *argv], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_model_dependent_ranges_after_loading(tmp_path):
    """--length and --steps beyond what the loaded model allows: one line, rc 2 (the default model, max_length 24)."""
    from PIL import Image

    photo = tmp_path / "x.jpg"
    Image.new("RGB", (32, 32), "red").save(photo)
    for argv, message in ((["--length", "30"], "at most 22 word pieces"), (["--steps", "5000"], "at most 1000")):
        r = subprocess.run([sys.executable, "-m", "ladic.cli", "caption", str(photo), "--no-progress", *argv],
                           capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                           timeout=300)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and lines == [lines[0]] and message in lines[0], r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "ladic.cli", "caption", str(photo), "--no-progress", "--length", "20"],
                       capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0 and len(r.stdout.split("\t")[1].split()) >= 10, r.stderr[-2000:]
    assert r.stderr.splitlines()[0] == ("warning: --length 20 is longer than 99 % of this model's training captions "
                                        "(at most 17 word pieces): expect a broken sentence")


def test_the_api_refuses_zero_steps_and_negative_guidance(tiny_model):
    import torch

    feats = torch.randn(1, tiny_model.image_encoder.num_tokens, tiny_model.image_encoder.dim)
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_model.generate(feats, num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_model.generate(feats, guidance_scale=-1.0)
