"""Training at scale (issue 29): streaming sources, bad samples, sharded resumable features, the DataLoader loop."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ladic.data.sources import BadSamples, CaptionSource, DataError

ROWS = 60  # synthetic pairs: 4 shards of 16 (the last one short)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from ladic.bench.synthetic import write_synthetic_pairs

    out = tmp_path_factory.mktemp("syn")
    return write_synthetic_pairs(out, ROWS, size=32, per_shard=16)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _config(tmp_path: Path, synthetic: dict, **extra) -> Path:
    cfg = {"preset": "tiny", "model": {"image_encoder": "tiny-frozen"}, "data": synthetic["jsonl"],
           "image_root": synthetic["image_root"], "batch_size": 8, "max_steps": 4, "lr": 0.002, "save_every": 2,
           "eval_every": 0, "val_images": 0, "log_every": 1, "progress": False, **extra}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _cli(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "ladic.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "ladic.cli"]
    return subprocess.run([*head, *args], env=_env(), capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------- sources
def test_pairs_are_streamed_in_units_of_shard_size(synthetic):
    src = CaptionSource(synthetic["jsonl"], synthetic["image_root"], shard_size=16)
    units = src.units()
    assert len(units) == 4
    bad = BadSamples()
    per_unit = [list(src.read(u, bad)) for u in units]
    assert [len(p) for p in per_unit] == [16, 16, 16, 12]
    assert bad.seen == ROWS and bad.skipped == 0
    first = json.loads(Path(synthetic["jsonl"]).read_text().splitlines()[0])
    assert per_unit[0][0].captions == [first["caption"]]
    assert per_unit[0][0].image == str(Path(synthetic["image_root"]) / first["image"])


def test_csv_pairs_have_the_same_units(tmp_path, synthetic):
    import csv

    rows = [json.loads(line) for line in Path(synthetic["jsonl"]).read_text().splitlines()]
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    a = [s.captions for s in CaptionSource(synthetic["jsonl"], synthetic["image_root"], shard_size=16)]
    b = CaptionSource(str(path), synthetic["image_root"], shard_size=16)
    assert len(b.units()) == 4 and [s.captions for s in b] == a


def test_webdataset_shards_give_the_same_samples(synthetic):
    wds = CaptionSource(synthetic["webdataset"], shard_size=16)
    assert wds.kind == "webdataset" and len(wds.units()) == 4
    pairs = list(CaptionSource(synthetic["jsonl"], synthetic["image_root"]))
    samples = list(wds)
    assert [s.captions for s in samples] == [s.captions for s in pairs]
    assert samples[0].image == Path(pairs[0].image).read_bytes()


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    import webdataset as wds
    from PIL import Image

    from ladic.data.shards import write_features
    from ladic import LaDiC, preset

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    with wds.TarWriter(str(tmp_path / "a.tar")) as tar:
        for i in range(8):
            tar.write({"__key__": f"ok{i}", "jpg": buf.getvalue(), "txt": "a red square"})
        tar.write({"__key__": "corrupt", "jpg": b"not a jpeg", "txt": "a red square"})
        tar.write({"__key__": "nocaption", "jpg": buf.getvalue(), "txt": "   "})
        tar.write({"__key__": "jsoncaption", "jpg": buf.getvalue(), "json": json.dumps({"caption": "a red square"})})
    model = LaDiC(preset("tiny", image_encoder="tiny-frozen"))
    src = CaptionSource(str(tmp_path / "a.tar"))
    res = write_features(model, src, tmp_path / "f", max_bad_share=0.5, progress=False)
    assert res.bad.skipped == 2 and res.bad.seen == 11
    assert any("corrupt" in e for e in res.bad.examples) and any("nocaption" in e for e in res.bad.examples)
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["images"] == 9 and manifest["skipped"] == 2
    with pytest.raises(DataError, match="skipped 2 of 11 samples.*max_bad_share"):
        write_features(model, src, tmp_path / "g", max_bad_share=0.1, progress=False)


# ---------------------------------------------------------------------------- sharded features
def test_features_of_two_gloo_processes_equal_one_and_resume_skips_finished_shards(tmp_path, synthetic):
    cfg = _config(tmp_path, synthetic)
    one, two = tmp_path / "one", tmp_path / "two"
    r = _cli("features", str(one), "--config", str(cfg), "--shard-size", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("features", str(two), "--config", str(cfg), "--shard-size", "16", nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 1: 2 shards written" in r.stdout
    for shard in sorted(p.name for p in one.glob("shard-*.safetensors")):
        a, b = load_file(str(one / shard)), load_file(str(two / shard))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((one / "manifest.json").read_text())["captions"] == ROWS
    # a run killed after two shards: those stay, the rerun writes only the rest
    for name in ("shard-000002.safetensors", "shard-000003.safetensors", "manifest.json"):
        (two / name).unlink()
    (two / "shard-000003.4242.tmp").write_bytes(b"partial")  # what a kill in the middle of a write leaves
    kept = (two / "shard-000000.safetensors").stat().st_mtime_ns
    r = _cli("features", str(two), "--config", str(cfg), "--shard-size", "16")
    assert r.returncode == 0 and "2 shards written, 2 already" in r.stdout, r.stdout + r.stderr[-2000:]
    assert (two / "shard-000000.safetensors").stat().st_mtime_ns == kept
    assert load_file(str(two / "shard-000003.safetensors")).keys() == load_file(str(one / "shard-000003.safetensors")).keys()
    # another setting in the same folder is refused, not mixed
    r = _cli("features", str(two), "--config", str(cfg), "--shard-size", "16", "--dtype", "float32")
    assert r.returncode == 2 and "another setting (dtype differ)" in r.stderr and "Traceback" not in r.stderr


def test_sharded_features_read_what_was_written(tmp_path, synthetic):
    from ladic import LaDiC, preset
    from ladic.data.shards import ShardedFeatures, write_features

    model = LaDiC(preset("tiny", image_encoder="tiny-frozen"))
    src = CaptionSource(synthetic["jsonl"], synthetic["image_root"], shard_size=16)
    write_features(model, src, tmp_path / "f", progress=False)
    ds = ShardedFeatures(tmp_path / "f")
    assert len(ds) == ROWS and ds.num_images == ROWS
    b = ds[[0, 17, 59]]
    assert b["images"].shape == (3, 64, 64) and b["hidden"].shape == (3, 12, 384) and b["ids"].dtype == torch.long
    assert b["image_index"].tolist() == [0, 17, 59]
    sample = list(src)[17]
    assert model.text.tokenizer.decode(b["ids"][1], skip_special_tokens=True) == sample.captions[0]
    vocab, lengths = ds.token_stats()
    assert lengths.sum() == ROWS and set(b["ids"][1].tolist()) <= set(vocab[0].tolist())
    ds.check_model(model)
    other = LaDiC(preset("tiny", image_encoder="tiny-frozen", max_length=16))
    with pytest.raises(DataError, match="max_length"):
        ds.check_model(other)


# ---------------------------------------------------------------------------- the loop
def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]


def test_training_from_shards_two_processes_and_accumulation_equal_one_process(tmp_path, synthetic):
    """Plain SGD: equal weights = equal averaged gradients (Adam would magnify float noise in its first steps)."""
    cfg = _config(tmp_path, synthetic, optimizer="sgd", lr=0.5)
    assert _cli("features", str(tmp_path / "f"), "--config", str(cfg), "--shard-size", "16").returncode == 0
    runs = {"one": ([], 1), "accum": (["grad_accum=2"], 1), "two": (["grad_accum=2"], 2)}
    for name, (extra, nproc) in runs.items():
        sets = [a for kv in [f"features_dir={tmp_path / 'f'}", *extra] for a in ("--set", kv)]
        r = _cli("train", "--config", str(cfg), *sets, "--out-dir", str(tmp_path / name), nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    one = _losses(tmp_path / "one")
    assert len(one) == 4
    for name in ("accum", "two"):
        assert _losses(tmp_path / name) == pytest.approx(one, rel=1e-5), name
        w1, w2 = (load_file(str(tmp_path / n / "checkpoint" / "weights.safetensors")) for n in ("one", name))
        assert all(torch.allclose(w1[k], w2[k], atol=1e-6, rtol=1e-4) for k in w1), name
    rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,latent,caption,lr,elapsed_s,samples_per_s,data_wait,peak_rss_mb") and len(rows) == 5


def test_online_training_from_pairs_and_from_webdataset(tmp_path, synthetic):
    for name, extra in {"records": [], "stream": [f"data={synthetic['webdataset']}"],
                        "resampled": [f"data={synthetic['webdataset']}", "resample_shards=true"]}.items():
        cfg = _config(tmp_path, synthetic, image_features="online", num_workers=1 if name == "stream" else 0,
                      keep_checkpoints=2, save_every=1)
        sets = [a for kv in extra for a in ("--set", kv)]
        r = _cli("train", "--config", str(cfg), *sets, "--out-dir", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-3000:]
        losses = _losses(tmp_path / name)
        assert len(losses) == 4 and all(l == l for l in losses)
        kept = sorted(p.name for p in (tmp_path / name).glob("checkpoint*"))
        assert kept == ["checkpoint", "checkpoint-0000003"], kept
        assert (tmp_path / name / "final" / "config.json").is_file()


def test_precision_bf16_and_epochs_on_cpu(tmp_path, synthetic):
    from ladic.train import TrainConfig, train

    cfg = _config(tmp_path, synthetic)
    tc = TrainConfig.load(cfg, ["precision=bf16", "epochs=1", "max_steps=100", f"out_dir={tmp_path / 'bf16'}"])
    train(tc)
    losses = _losses(tmp_path / "bf16")
    assert len(losses) == ROWS // 8 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("args, message", [
    (["--set", "features_dir=/nonexistent"], "features_dir '/nonexistent': not a finished `ladic features` folder"),
    (["--set", "data=/nonexistent/train-{0..3}.tar"], "data: 4 of 4 webdataset shards not found"),
    (["--set", "precision=fp8"], "precision must be one of auto, fp32, bf16, fp16"),
    (["--set", "grad_accum=3"], "batch_size 8 is not divisible by grad_accum 3"),
    (["--set", "image_features=online", "--set", "references=consensus"], "references=consensus need(s) the in-RAM feature cache"),
])
def test_bad_scale_options_are_one_line(tmp_path, synthetic, args, message):
    r = _cli("train", "--config", str(_config(tmp_path, synthetic)), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_webdataset_without_features_or_online_is_one_line(tmp_path, synthetic):
    r = _cli("train", "--config", str(_config(tmp_path, synthetic)), "--set", f"data={synthetic['webdataset']}")
    assert r.returncode == 2 and "webdataset shards train from a `ladic features` folder" in r.stderr
    assert "Traceback" not in r.stderr


def test_step_batches_split_the_same_global_batch_over_ranks_and_micro_batches():
    from ladic.data.loader import StepBatches
    from ladic.train import global_batch

    one = list(StepBatches(40, 8, seed=3, start=0, stop=12))
    assert [p.rows for p in one] == [tuple(global_batch(40, 8, 3, s).tolist()) for s in range(12)]
    assert sorted(r for p in one[:5] for r in p.rows) == list(range(40))  # an epoch is a permutation
    split = [list(StepBatches(40, 8, 3, 0, 12, rank=r, world=2, accum=2)) for r in range(2)]
    for s in range(12):
        parts = [p for plans in split for p in plans if p.step == s]
        rows = dict(kv for p in parts for kv in zip(p.positions, p.rows))
        assert [rows[i] for i in range(8)] == list(one[s].rows)
    resumed = list(StepBatches(40, 8, 3, start=7, stop=12))
    assert [p.rows for p in resumed] == [p.rows for p in one[7:]]
    with pytest.raises(ValueError, match="not divisible"):
        StepBatches(40, 8, 3, 0, 1, world=3)


def test_row_draws_do_not_depend_on_how_the_batch_is_split(tiny_model):
    from ladic.data.loader import row_draws

    whole = row_draws(tiny_model, 0, 5, range(8))
    halves = [row_draws(tiny_model, 0, 5, range(0, 4)), row_draws(tiny_model, 0, 5, range(4, 8))]
    for k in whole:
        assert torch.equal(whole[k], torch.cat([h[k] for h in halves])), k
    assert not torch.equal(whole["noise"], row_draws(tiny_model, 0, 6, range(8))["noise"])
    assert row_draws(tiny_model, 0, 5, [])["noise"].shape[0] == 0


def test_features_of_a_pooled_hf_tower(tmp_path, synthetic):
    """image_token_grid pools a ViT's patches (CLS kept) before the tokens are cached: 1 + 4 x 4 -> 1 + 2 x 2."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from ladic import LaDiC, preset
    from ladic.data.shards import ShardedFeatures, write_features
    from ladic.image_encoders import EncoderLoadError

    tower = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tower)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tower)
    model = LaDiC(preset("tiny", image_encoder=f"hf:{tower}", image_token_grid=2))
    assert model.image_encoder.name == f"hf:{tower}-grid2" and model.image_encoder.num_tokens == 5
    write_features(model, CaptionSource(synthetic["jsonl"], synthetic["image_root"], shard_size=32), tmp_path / "f",
                   progress=False)
    ds = ShardedFeatures(tmp_path / "f")
    assert ds[[0, 40]]["images"].shape == (2, 5, 32) and ds.spec["num_tokens"] == 5
    with pytest.raises(EncoderLoadError, match="image_token_grid 3: cannot pool 64 tokens of tiny-frozen"):
        LaDiC(preset("tiny", image_encoder="tiny-frozen", image_token_grid=3))
