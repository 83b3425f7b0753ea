"""Training: DDP on 2 CPU processes equals one process; SIGKILL + resume is exact; NaN stops cleanly."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ladic.train import TrainConfig, TrainingDiverged, global_batch, lr_factor, train

COMMON = [
    "preset=tiny", "data=scenes", "num_scenes=64", "scene_size=32", "batch_size=8", "val_images=0",
    "eval_every=0", "progress=false", "log_every=1", "lr=0.001",
]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _train_cmd(out: Path, steps: int, extra: list[str] = (), nproc: int = 1) -> list[str]:
    sets = [a for kv in COMMON + [f"max_steps={steps}", f"out_dir={out}", *extra] for a in ("--set", kv)]
    if nproc == 1:
        return [sys.executable, "-m", "ladic.cli", "train", *sets]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "ladic.cli", "train", *sets]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "weights.safetensors"))


def test_global_batch_is_a_deterministic_permutation():
    a = torch.cat([global_batch(20, 5, 0, s) for s in range(4)])
    assert sorted(a.tolist()) == list(range(20))
    assert torch.equal(global_batch(20, 5, 0, 7), global_batch(20, 5, 0, 7))
    assert not torch.equal(global_batch(20, 5, 0, 0), global_batch(20, 5, 1, 0))


def test_lr_schedule_warmup_and_decay():
    tc = TrainConfig(max_steps=100, warmup_ratio=0.1)
    assert lr_factor(tc, 0) == pytest.approx(0.1) and lr_factor(tc, 9) == pytest.approx(1.0)
    assert lr_factor(tc, 55) == pytest.approx(0.5) and lr_factor(tc, 100) == 0.0


def test_ddp_two_processes_match_one_process(tmp_path):
    """Plain SGD makes the weight change proportional to the gradient, so equal weights = averaged gradients."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["optimizer=sgd", "lr=0.5", "warmup_ratio=0.01"]
    subprocess.run(_train_cmd(one, 3, extra), check=True, env=_env(), capture_output=True)
    r = subprocess.run(_train_cmd(two, 3, extra, nproc=2), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6, rtol=1e-4), k
    fresh = _fresh_weights()
    moved = [k for k in w1 if not torch.allclose(fresh[k], w1[k], atol=1e-6)]
    assert len(moved) > len(w1) // 2
    log = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == [1, 2, 3]


def _fresh_weights() -> dict[str, torch.Tensor]:
    from ladic import LaDiC, preset

    torch.manual_seed(0)
    return LaDiC(preset("tiny")).trainable_state_dict()


def test_sigkill_and_resume_is_exact(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ["save_every=2"]
    subprocess.run(_train_cmd(full, 8, extra), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(_train_cmd(killed, 8, extra), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            step = torch.load(state, weights_only=True)["step"]
            if step >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = torch.load(state, weights_only=True)["step"]
    assert 2 <= stopped_at < 8
    r = subprocess.run([*_train_cmd(killed, 8, extra), "--resume"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoint'} at step" in r.stdout
    a, b = _weights(full), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(str(full / "checkpoint" / "ema.safetensors"))
    eb = load_file(str(killed / "checkpoint" / "ema.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_init_from_a_model_folder(tmp_path):
    """Fine-tuning starts from the folder's weights and latent stats; a different architecture is refused."""
    from ladic.checkpoint import CheckpointError
    from ladic.models import load_model

    first = train(TrainConfig.load(None, COMMON + [f"out_dir={tmp_path / 'a'}", "max_steps=2"]))
    start = train(TrainConfig.load(None, COMMON + [f"out_dir={tmp_path / 'b'}", "max_steps=0", f"init_from={first}"]))
    a, b = load_model(first), load_model(start)
    from ladic.data.scenes import make_scenes

    lengths = sorted(min(len(a.text.tokenizer.tokenize(c)), a.config.max_length - 2)
                     for s in make_scenes(64, seed=0, size=32, max_objects=1) for c in s.captions)
    assert a.config.trained_length_p99 == lengths[math.ceil(0.99 * (len(lengths) - 1))] >= 3  # stored with the model
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.text.latent_std, b.text.latent_std) and torch.equal(a.text.latent_mean, b.text.latent_mean)
    more = train(TrainConfig.load(None, COMMON + [f"out_dir={tmp_path / 'c'}", "max_steps=2", f"init_from={first}"]))
    assert not all(torch.equal(sa[k], v) for k, v in load_model(more).trainable_state_dict().items())
    with pytest.raises(CheckpointError, match="do not match"):
        train(TrainConfig.load(None, COMMON + [f"out_dir={tmp_path / 'd'}", "max_steps=1", f"init_from={first}",
                                               "model.hidden_size=64"]))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    tc = TrainConfig.load(None, COMMON + [f"out_dir={tmp_path}", "max_steps=6", "save_every=2", "fail_at_step=3"])
    with pytest.raises(TrainingDiverged, match="step 3"):
        train(tc)
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert load_file(str(tmp_path / "checkpoint" / "weights.safetensors"))


def test_config_overrides_and_errors(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"preset": "tiny", "lr": 0.01}))
    tc = TrainConfig.load(cfg, ["max_steps=7", "model.num_layers=1", "data=scenes"])
    assert tc.lr == 0.01 and tc.max_steps == 7 and tc.model == {"num_layers": 1}
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.load(None, ["nope=1"])
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig.load(None, ["oops"])


def test_distillation_trains_on_the_teacher_captions(tmp_path, monkeypatch):
    """distill_from: each training image's target becomes the teacher's caption of it (cached), optionally
    followed by the human captions; the teacher can be an AR model or a LaDiC model."""
    import ladic.models
    from ladic import LaDiC, preset
    from ladic.baselines import ARCaptioner
    from ladic.checkpoint import CheckpointError
    from ladic.data.distill import teacher_captions
    from ladic.data.scenes import make_scenes
    from ladic.train import load_datasets

    torch.manual_seed(0)
    teacher = ARCaptioner(preset("tiny"))
    teacher.save_pretrained(tmp_path / "teacher")
    scenes = make_scenes(64, seed=0, size=32, max_objects=1)
    expected = teacher.caption([s.image for s in scenes], num_beams=2)
    tc = TrainConfig.load(None, COMMON + [f"distill_from={tmp_path / 'teacher'}", "distill_beams=2"])
    student = LaDiC(preset("tiny"))
    train_set, _, _ = load_datasets(tc, student, progress=False)
    assert len(train_set) == 64 and train_set.caption_image.tolist() == list(range(64))
    targets = student.text.ids_to_text(train_set.ids, collapse_repeats=False)
    assert targets == student.text.ids_to_text(student.text.tokenize(expected)["input_ids"], collapse_repeats=False)
    assert all(t not in s.captions for t, s in zip(targets, scenes))  # a random teacher writes no scene caption
    both, _, _ = load_datasets(TrainConfig.load(None, COMMON + [f"distill_from={tmp_path / 'teacher'}", "distill_beams=2",
                                                                 "distill_keep_references=true"]), student, progress=False)
    per_image = len(scenes[0].captions) + 1
    assert len(both) == 64 * per_image and both.caption_image[:per_image].tolist() == [0] * per_image
    # The captions are cached by teacher weights, beams and image ids: a second call does not load the teacher.
    ids = [f"img{i}" for i in range(4)]
    imgs = [s.image for s in scenes[:4]]
    first = teacher_captions(tmp_path / "teacher", ids, imgs, num_beams=1, cache_dir=tmp_path / "cache")
    assert first == teacher.caption(imgs)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although its captions are cached")

    monkeypatch.setattr(ladic.models, "load_model", no_teacher)
    assert teacher_captions(tmp_path / "teacher", ids, imgs, num_beams=1, cache_dir=tmp_path / "cache") == first
    with pytest.raises(AssertionError, match="cached"):  # other beams: another cache entry
        teacher_captions(tmp_path / "teacher", ids, imgs, num_beams=2, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    assert len(list((tmp_path / "cache").glob("teacher-*.json"))) == 1

    with pytest.raises(CheckpointError, match="not a model folder"):
        teacher_captions(tmp_path / "nowhere", ids, imgs, cache_dir=tmp_path / "cache")
    steps = train(TrainConfig.load(None, COMMON + [f"out_dir={tmp_path / 'run'}", "max_steps=2",
                                                    f"distill_from={tmp_path / 'teacher'}"]))
    assert (steps / "model.safetensors").is_file()


def test_validation_logs_restore_accuracy_for_ladic(tmp_path):
    """LaDiC validation records the share of noised reference tokens one denoiser call restores (restore@t)."""
    sets = [kv for kv in COMMON if not kv.startswith(("val_images", "eval_every"))]
    train(TrainConfig.load(None, sets + [f"out_dir={tmp_path}", "max_steps=2", "eval_every=2", "val_images=4"]))
    vals = [json.loads(line)["val"] for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(vals) == 1 and vals[0]["step"] == 2
    assert all(0.0 <= vals[0][f"restore@{t}"] <= 1.0 for t in (300, 600, 900))


def test_distill_select_references_trains_on_the_draw_closest_to_the_human_captions(tmp_path):
    """distill_select="references": of a LaDiC teacher's distill_mbr draws per image, the one with the highest
    CIDEr-D against the image's human captions becomes the target (not the MBR choice)."""
    from ladic import LaDiC, preset
    from ladic.data.captions import CaptionRecord
    from ladic.data.distill import select_by_references
    from ladic.data.scenes import make_scenes
    from ladic.train import load_datasets

    torch.manual_seed(0)
    LaDiC(preset("tiny")).save_pretrained(tmp_path / "teacher")
    teacher = LaDiC.from_pretrained(tmp_path / "teacher")
    scenes = make_scenes(64, seed=0, size=32, max_objects=1)
    cands = teacher.generate([s.image for s in scenes], mbr_candidates=3, seed=0).candidates
    records = [CaptionRecord(f"train{i}", "", s.captions, "train") for i, s in enumerate(scenes)]
    expected = select_by_references(cands, records)
    assert expected != teacher.caption([s.image for s in scenes], mbr_candidates=3, seed=0)  # not the MBR choices
    opts = COMMON + [f"distill_from={tmp_path / 'teacher'}", "distill_mbr=3", f"cache_dir={tmp_path / 'cache'}"]
    student = LaDiC(preset("tiny"))
    train_set, _, _ = load_datasets(TrainConfig.load(None, opts + ["distill_select=references"]), student, progress=False)
    targets = student.text.ids_to_text(train_set.ids, collapse_repeats=False)
    assert targets == student.text.ids_to_text(student.text.tokenize(expected)["input_ids"], collapse_repeats=False)
    with pytest.raises(ValueError, match="distill_select"):
        load_datasets(TrainConfig.load(None, opts + ["distill_select=best"]), student, progress=False)


def test_distill_select_references_with_an_ar_teacher_picks_among_its_beams(tmp_path):
    """An AR teacher (distill_from) with distill_select="references": the target is selected among its distill_beams
    beams per photo; a selection needs at least two beams."""
    from ladic import LaDiC, preset
    from ladic.baselines import ARCaptioner
    from ladic.data.captions import CaptionRecord
    from ladic.data.distill import select_by_references, teacher_captions
    from ladic.data.scenes import make_scenes
    from ladic.train import load_datasets

    torch.manual_seed(0)
    ARCaptioner(preset("tiny")).save_pretrained(tmp_path / "ar")
    scenes = make_scenes(16, seed=0, size=32, max_objects=1)
    images = [s.image for s in scenes]
    beams = ARCaptioner.from_pretrained(tmp_path / "ar").generate(images, num_beams=3).candidates
    assert all(len(b) == 3 for b in beams)
    records = [CaptionRecord(f"train{i}", "", s.captions, "train") for i, s in enumerate(scenes)]
    student = LaDiC(preset("tiny"))
    ar_opts = COMMON + ["num_scenes=16", f"distill_from={tmp_path / 'ar'}", "distill_beams=3", "distill_select=references",
                        f"cache_dir={tmp_path / 'cache'}"]
    train_set, _, _ = load_datasets(TrainConfig.load(None, ar_opts), student, progress=False)
    assert student.text.ids_to_text(train_set.ids, collapse_repeats=False) == student.text.ids_to_text(
        student.text.tokenize(select_by_references(beams, records))["input_ids"], collapse_repeats=False)
    with pytest.raises(ValueError, match="num_beams >= 2"):
        teacher_captions(tmp_path / "ar", ["a"], images[:1], num_beams=1, candidates=True)


def test_a_checkpoint_from_before_issue_28_resumes_and_exports_unscaled(tmp_path):
    """A training checkpoint without model_config.json (written before input_scaling existed) is resumed only
    with the unscaled input it was trained with, and exported as such."""
    from ladic.models import load_model

    tc = TrainConfig.load(None, COMMON + [f"out_dir={tmp_path}", "max_steps=2", "save_every=2"])
    train(tc)
    ckpt = tmp_path / "checkpoint"
    assert json.loads((ckpt / "model_config.json").read_text())["input_scaling"] == "unit_variance"
    (ckpt / "model_config.json").unlink()  # as an older checkpoint
    more = TrainConfig.load(None, COMMON + [f"out_dir={tmp_path}", "max_steps=3"])
    with pytest.raises(ValueError, match="--set model.input_scaling=none"):
        train(more, resume=True)
    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "ladic.cli", "export", str(ckpt), str(out)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_model(out).config.input_scaling == "none"
    more.model["input_scaling"] = "none"
    train(more, resume=True)  # resumes: the weights were trained unscaled
