"""Bad option values of the CLI: one ``error:`` line and exit code 2, before or right after the model loads."""

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
    (["caption", "X", "--model", "someone/some-model"], "no such local model folder"),
    (["infill", "X", "a ___ dog", "--model", "someone/some-model"], "no such local model folder"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_is_one_line(argv, message, tmp_path):
    photo = tmp_path / "x.jpg"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(photo)
    argv = [str(photo) if a == "X" else a for a in argv]
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


def test_the_api_refuses_zero_steps_and_negative_guidance(tiny_model):
    import torch

    feats = torch.randn(1, tiny_model.image_encoder.num_tokens, tiny_model.image_encoder.dim)
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_model.generate(feats, num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_model.generate(feats, guidance_scale=-1.0)
