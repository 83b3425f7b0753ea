"""``ladic bench`` at toy scale: the files and rows it writes (never timings)."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from ladic import bench
from ladic.cli import main
from ladic.config import preset
from ladic.data.captions import CaptionRecord
from ladic.metrics import java_available

JAVA_OK, JAVA_INFO = java_available()
needs_java = pytest.mark.skipif(not JAVA_OK, reason=f"Java is needed by pycocoevalcap ({JAVA_INFO})")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_header(out: Path, stem: str) -> dict:
    data = json.loads((out / f"{stem}.json").read_text())
    meta = data["meta"]
    assert list(data)[0] == "meta"
    assert meta["date_utc"].endswith("UTC") and meta["machine"]["cpu"] and meta["machine"]["torch"] == torch.__version__
    assert meta["machine"]["torch_threads"] >= 1 and meta["machine"]["logical_cores"] >= 1
    md = (out / f"{stem}.md").read_text()
    head = md.split("\n\n")[1]
    assert "- command: `" in head and "- date: " in head and "- machine: " in head and "torch threads" in head
    if (out / f"{stem}.png").exists():
        assert (out / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
    return data


def test_latency_toy(tmp_path):
    out = tmp_path / "bench"
    rc = main(["bench", "latency", "--preset", "tiny", "--lengths", "8,12", "--batch-sizes", "1,2", "--steps", "1,5",
               "--bnr", "on", "--beams", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
               "--out-dir", str(out)])
    assert rc == 0
    data = _check_header(out, "latency")
    rows = data["rows"]
    labels = ["LaDiC 1 step +B&R", "LaDiC 5 steps +B&R", "AR greedy", "AR beam 2"]
    assert len(rows) == 2 * 2 * 2 * len(labels)
    keys = {(r["length"], r["batch"], r["mode"], r["label"]) for r in rows}
    assert keys == {(n, b, m, lab) for n in (8, 12) for b in (1, 2) for m in ("decoder", "e2e") for lab in labels}
    for r in rows:
        assert r["median_s"] > 0 and len(r["times_s"]) == 1
        if r["system"] == "AR":
            assert r["nfe"] == r["length"]  # forced length: no early stop
        else:
            assert r["nfe"] >= r["steps"] and r["guidance"] == 1.0
    md = (out / "latency.md").read_text()
    assert "randomly initialised" in md and "| AR beam 2 | N |" in md
    assert md.count("## ") == 4  # (decoder, e2e) x (batch 1, 2)


def test_ar_timing_model_runs_exactly_n_steps(tiny_model):
    _, ar = bench.build_timing_models("tiny", 9, tiny_model.image_encoder, "cpu")
    feats = torch.randn(2, tiny_model.image_encoder.num_tokens, tiny_model.image_encoder.dim)
    for beams in (1, 2):
        out = ar.generate(feats, num_beams=beams, max_new_tokens=9)
        assert out.num_evaluations == 9


def test_flops_toy(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "flops", "--preset", "tiny", "--flops-batch", "2", "--matmul-size", "256",
                 "--repeats", "1", "--warmup", "0", "--out-dir", str(out)]) == 0
    data = _check_header(out, "flops")
    rows = {r["case"]: r for r in data["rows"]}
    assert rows["matmul (reference)"]["flops"] == 2 * 256**3
    assert rows["matmul (reference)"]["fraction_of_matmul"] == 1.0
    for name in ("diffuser forward", "diffuser forward, CFG pair", "text decoder + LM head"):
        assert rows[name]["flops"] > 0 and rows[name]["gflops_per_s"] > 0
    assert rows["diffuser forward, CFG pair"]["flops"] > rows["diffuser forward"]["flops"]
    assert "FlopCounterMode" in (out / "flops.md").read_text()


def test_quality_rows_grid():
    axes = bench.quality_rows("axes", steps=(5, 30), mbr=5, guidances=(0, 1, 2), beams=3)
    names = [r.name for r in axes]
    assert len(names) == len(set(names)) == 2 * 5 + 2
    assert names[-2:] == ["AR greedy", "AR beam 3"]
    assert axes[0].sampling == {"num_inference_steps": 5, "back_and_refine": True, "mbr_candidates": 1,
                                "guidance_scale": 1.0, "seed": 0}
    full = bench.quality_rows("full", steps=(5, 30), mbr=5, guidances=(0, 1, 2), ar=False)
    assert len(full) == 2 * 2 * 2 * 3 and all(r.model == "ladic" for r in full)
    with pytest.raises(ValueError):
        bench.quality_rows("nope")


def test_buckets():
    assert bench.bucket_labels((9, 11, 13)) == ["<=9", "10-11", "12-13", ">=14"]
    assert [bench.bucket_of(w, (9, 11, 13)) for w in (3, 9.4, 9.6, 11, 12, 13.4, 14, 30)] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.fixture()
def fake_split(tmp_path, scenes, monkeypatch):
    """5 images on disk with references of 6, 10, 12, 15 and 16 words; feature cache in tmp."""
    monkeypatch.setenv("LADIC_CACHE", str(tmp_path / "cache"))
    words = "a small red dog runs across the green grass near a tall tree in the park today".split()
    records = []
    for i, n in enumerate((6, 10, 12, 15, 16)):
        path = tmp_path / f"img{i}.png"
        scenes[i].image.save(path)
        caps = [" ".join(words[:n])] * 4 + [" ".join(words[1 : n + 1])]
        records.append(CaptionRecord(f"img{i}", str(path), caps, "val"))
    return records


@needs_java
def test_quality_and_lengths_tables_tiny(tmp_path, tiny_model, fake_split):
    from ladic.baselines.ar import ARCaptioner

    torch.manual_seed(0)
    ar = ARCaptioner(preset("tiny"), image_encoder=tiny_model.image_encoder).eval()
    models = {"ladic": tiny_model, "ar": ar}
    rows = bench.quality_rows("axes", steps=(1,), mbr=2, guidances=(0, 1), beams=2)
    chosen = [rows[0], next(r for r in rows if r.name == "AR greedy")]  # 2 rows: coco_metrics is slow (Java)
    memo = bench.CaptionMemo()
    table = bench.quality_table(models, fake_split, chosen, batch_size=4, memo=memo, log=lambda s: None)
    assert [r["name"] for r in table] == [r.name for r in chosen]
    for r in table:
        assert set(r["scores"]) == set(bench.QUALITY_METRICS)
        assert all(v is not None and v >= 0 for v in r["scores"].values())
        assert r["images"] == 5 and r["decode_s"] >= 0
    meta = bench.run_meta({"what": ["quality"]})
    out = tmp_path / "bench"
    out.mkdir()
    bench.write_quality(table, ["toy split"], out, meta)
    _check_header(out, "quality")
    md = (out / "quality.md").read_text()
    assert "| setting | BLEU-4 | METEOR | ROUGE-L | CIDEr | decode s | ms / image |" in md
    assert "| AR greedy |" in md
    # Rows whose model is missing are skipped.
    assert bench.quality_table({"ladic": tiny_model, "ar": None}, fake_split, chosen[1:], memo=memo,
                               log=lambda s: None) == []

    # lengths: the same (model, sampling) pairs come from the memo; one bucket per reference length.
    systems = [("LaDiC", tiny_model, chosen[0].sampling), ("AR greedy", ar, chosen[1].sampling)]
    res = bench.lengths_table(systems, fake_split, (9, 11, 13), memo=memo, log=lambda s: None)
    assert [b["images"] for b in res["buckets"]] == [1, 1, 1, 2]
    assert [r["label"] for r in res["rows"]] == ["LaDiC", "AR greedy"]
    for r in res["rows"]:
        assert [p["bucket"] for p in r["buckets"]] == ["<=9", "10-11", "12-13", ">=14"]
        assert all(p["BLEU-4"] is not None for p in r["buckets"])
    bench.lengths_plot(res, out / "lengths.png", meta)
    assert (out / "lengths.png").read_bytes()[:8] == PNG_MAGIC


def test_ablations_train_once_then_skip(tmp_path, tiny_model, fake_split, monkeypatch):
    """Orchestration only: training and the metrics are stubbed (both are tested elsewhere)."""
    import ladic.metrics
    from ladic.captioner import LaDiC
    from ladic.metrics import MetricsResult

    trained = []

    def fake_train(tc, resume=False):
        assert resume and tc.max_steps == 3 and tc.data == "flickr8k" and tc.train_images == 2000
        trained.append((Path(tc.out_dir).name, dict(tc.model)))
        same_encoder = {k: v for k, v in tc.model.items() if k != "image_encoder"}  # no DINOv2 conversion here
        m = LaDiC(preset("tiny", **same_encoder), image_encoder=tiny_model.image_encoder)
        m.save_pretrained(Path(tc.out_dir) / "final")
        (Path(tc.out_dir) / "log.jsonl").write_text(json.dumps({"step": 3, "loss": 1.5, "caption": 2.0}) + "\n")
        return Path(tc.out_dir) / "final"

    def fake_metrics(results, refs, **kw):
        return MetricsResult(scores={m: 0.5 for m in bench.QUALITY_METRICS}, unavailable={}, settings="stub")

    monkeypatch.setattr(ladic.metrics, "coco_metrics", fake_metrics)
    monkeypatch.setattr(bench.ablations, "require_java", lambda: None)
    kw = dict(preset_name="tiny", max_steps=3, eval_steps=1, caption_batch=5, train_fn=fake_train, log=lambda s: None)
    res = bench.run_ablations(fake_split[:2], tmp_path / "abl", **kw)
    assert [n for n, _ in trained] == ["full", "no_caption_loss", "no_norm_reassign", "prepend_image", "dinov2_encoder"]
    assert trained[3][1] == {"image_conditioning": "prepend"} and trained[4][1] == {"image_encoder": "dinov2-s"}
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == [a.name for a in bench.ABLATIONS]
    assert rows["no_back_and_refine"]["trained_as"] == "full"
    assert rows["no_back_and_refine"]["sampling"]["back_and_refine"] is False
    assert rows["full"]["final_train_loss"] == 1.5
    assert set(rows["full"]["restore_accuracy"]) == set(bench.RESTORE_TIMESTEPS)
    assert rows["no_back_and_refine"]["restore_accuracy"] == rows["full"]["restore_accuracy"]
    assert all(0 <= a <= 1 for r in rows.values() for a in r["restore_accuracy"].values())
    trained.clear()
    res = bench.run_ablations(fake_split[:2], tmp_path / "abl", **kw)
    assert trained == [] and all(r["skipped_training"] for r in res["rows"])
    md = bench.ablations_markdown(res, ["toy"], bench.run_meta({}))
    assert "| full model |" in md and "Back&Refine off" in md and "restore % t=600" in md


def test_dangling_share():
    assert bench.dangling_share(["a dog on a", "a dog runs"]) == 0.5
    assert bench.dangling_share(["A man sits next to the.", "two dogs play with their", "", "a girl swims"]) == 0.5
    assert bench.dangling_share([]) == 0.0
    assert {"a", "the", "of", "with", "and", "his", "their", "while"} <= bench.FUNCTION_WORDS


def test_oov_share_against_training_words():
    vocab = bench.training_text(["A dog runs.", "the cat's toy"]).words
    assert vocab == {"a", "dog", "runs", "the", "cat", "s", "toy"}
    assert bench.caption_words("A dog's ball.") == ["a", "dog", "s", "ball"]
    assert bench.oov_share(["a dog flies", "the cat runs"], vocab) == pytest.approx(1 / 6)
    assert bench.oov_share(["a dog"], vocab) == 0.0 and bench.oov_share([""], vocab) == 0.0
    assert bench.oov_share(["a dog"], None) is None
    assert bench.caption_stats(["a dog on a"], None) == {"dangling_share": 1.0, "broken_pair_share": None,
                                                         "oov_share": None}


def test_broken_pairs_against_training_pairs():
    train = bench.training_text(["a dog runs into the water", "a woman and a man", "two dogs are running"] * 50
                                + ["a rare zebra"])
    assert train.counts["dog"] == 50 and ("into", "the") in train.pairs
    # "into a" and "a the": frequent words never adjacent in training; "rare zebra" is seen, "zebra runs" too rare
    assert bench.broken_pairs("a dog runs into a the water", train) == [("into", "a"), ("a", "the")]
    assert bench.broken_pairs("a woman and a man", train) == []
    assert bench.broken_pairs("a zebra runs", train) == []
    assert bench.broken_pairs("a zebra runs", train, frequent=1) == [("a", "zebra"), ("zebra", "runs")]
    caps = ["a dog runs into the water", "a woman and a woman are and a woman", "", "a man and a dog"]
    assert bench.broken_pair_share(caps, train) == 0.5  # "woman are" and "are and"; "man and"
    assert bench.broken_pair_share([], train) == 0.0 and bench.broken_pair_share(caps, None) is None


def test_quality_table_stores_caption_stats(monkeypatch):
    """Metrics and decoding stubbed: only the two caption statistics of each row are checked."""
    import ladic.metrics
    from ladic.metrics import MetricsResult

    class FakeMemo:
        def get(self, model, records, sampling, batch_size, progress):
            return {"i0": "a dog runs on the", "i1": "a zebra runs"}, 1.0

    monkeypatch.setattr(ladic.metrics, "coco_metrics", lambda results, refs, **kw: MetricsResult(
        scores={m: 0.5 for m in bench.QUALITY_METRICS}, unavailable={}, settings="stub"))
    monkeypatch.setattr(bench.quality, "require_java", lambda: None)
    records = [CaptionRecord(f"i{i}", f"i{i}.jpg", ["a dog runs"] * 5, "val") for i in range(2)]
    rows = bench.quality_rows("axes", steps=(1,), mbr=1, guidances=(1,), ar=False)[:1]
    for train, oov, broken in ((bench.training_text(["a dog runs on the"] * 50), 1 / 8, 0.0), (None, None, None)):
        (row,) = bench.quality_table({"ladic": object()}, records, rows, memo=FakeMemo(), train_text=train,
                                     log=lambda s: None)
        assert row["dangling_share"] == 0.5 and row["oov_share"] == oov and row["broken_pair_share"] == broken


def test_markdown_shows_caption_stats_and_tolerates_old_json():
    meta = bench.run_meta({})
    scores = {m: 0.25 for m in bench.QUALITY_METRICS}
    old = {"name": "old", "model": "ladic", "scores": scores, "decode_s": 1.0, "ms_per_image": 5.0}
    new = {**old, "name": "new", "dangling_share": 0.125, "broken_pair_share": 0.25, "oov_share": None}
    md = bench.quality_markdown([old, new], [], meta)
    assert "| decode s | ms / image | dangling % | broken pair % | OOV words % |" in md
    assert "| old | 25.0 | 25.0 | 25.0 | 25.0 | 1.00 | 5.0 | – | – | – |" in md
    assert "| new | 25.0 | 25.0 | 25.0 | 25.0 | 1.00 | 5.0 | 12.5 | 25.0 | – |" in md
    per = [{"bucket": "<=9", "images": 1, "BLEU-4": 0.5, "mean_caption_words": 8.0}]
    res = {"buckets": [{"bucket": "<=9", "images": 1}],
           "rows": [{"label": "old", "overall_BLEU-4": 0.5, "buckets": per},
                    {"label": "new", "overall_BLEU-4": 0.5, "buckets": per, "dangling_share": 0.0, "oov_share": 0.02}]}
    md = bench.lengths_markdown(res, [], meta)
    assert "| old | 8.0 | – | – | – |" in md and "| new | 8.0 | 0.0 | – | 2.0 |" in md


def test_session_loads_training_text_once(monkeypatch):
    import ladic.data.captions

    calls = []

    def fake_load(split):
        calls.append(split)
        return [CaptionRecord("i0", "i0.jpg", ["A dog runs.", "a cat"], split)]

    monkeypatch.setattr(ladic.data.captions, "load_flickr8k", fake_load)
    session = bench.Session(argparse.Namespace())
    assert session.train_text().words == {"a", "dog", "runs", "cat"} and session.train_text() is session.train_text()
    assert calls == ["train"]

    def missing(split):
        raise FileNotFoundError("no Flickr8k")

    monkeypatch.setattr(ladic.data.captions, "load_flickr8k", missing)
    assert bench.Session(argparse.Namespace()).train_text() is None


def test_bench_arguments_import_without_torch():
    import subprocess
    import sys

    code = "import sys; from ladic.bench import add_bench_arguments; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_denoising_accuracy_counts_first_reference_words(tiny_model, fake_split, monkeypatch):
    """With a denoiser that returns x_t, t=0 is the decoder's accuracy on the true latents (computed by hand);
    only each image's first reference and only its word positions count."""
    from ladic.data.features import build_features
    from ladic.evaluate import denoising_accuracy, feature_cache_dir

    feats = build_features(tiny_model, fake_split, feature_cache_dir())
    monkeypatch.setattr(tiny_model.diffuser, "forward", lambda x_t, t, sc, kv: x_t)
    acc = denoising_accuracy(tiny_model, feats, timesteps=(0, 999), batch_size=2)
    first = torch.tensor([5 * i for i in range(len(fake_split))])
    assert feats.caption_image[first].tolist() == list(range(len(fake_split)))
    ids = feats.ids[first].long()
    with torch.no_grad():
        x0 = tiny_model.text.regularize(feats.hidden[first], ids)
        pred = tiny_model.text.logits(x0).argmax(-1)
    words = ~tiny_model.text.special_mask(ids)
    room = tiny_model.config.max_length - 2  # [CLS] ... [SEP], longer references are truncated
    assert words.sum() == sum(min(len(tiny_model.text.tokenizer.tokenize(r.captions[0])), room) for r in fake_split)
    expected = float(((pred == ids) & words).sum() / words.sum())
    assert acc[0] == pytest.approx(expected, abs=1e-6)
    assert 0 <= acc[999] <= 1


def test_bad_subcommand():
    assert main(["bench", "nope"]) == 2


def test_curves_read_training_logs(tmp_path):
    import json

    from ladic.bench.curves import curves_markdown, read_curve

    run = tmp_path / "arm-a"
    run.mkdir()
    lines = [
        {"step": 50, "loss": 3.0, "elapsed_s": 60.0},
        {"val": {"step": 100, "CIDEr": 0.2, "BLEU-4": 0.05, "examples": ["a dog"]}},
        {"step": 150, "loss": 2.0, "elapsed_s": 180.0},
        {"val": {"step": 200, "CIDEr": 0.3, "BLEU-4": 0.08, "examples": ["a dog runs"]}},
        {"val": {"step": 200, "CIDEr": 0.35, "BLEU-4": 0.09, "examples": ["a dog runs fast"]}},  # after a resume
    ]
    (run / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"torn")
    c = read_curve(run)
    assert c["steps"] == [100, 200] and c["CIDEr"] == [0.2, 0.35] and c["elapsed_s"] == 180.0
    assert c["examples"] == ["a dog runs fast"]
    from ladic.bench.report import run_meta

    meta = run_meta({})
    md = curves_markdown([c], ["recipe"], meta)
    assert "| arm-a | 20.0 | 35.0 | 35.0 |" in md
    with pytest.raises(FileNotFoundError, match="training log"):
        read_curve(tmp_path / "nothing")


def _row(name, model, ms, cider):
    return {"name": name, "model": model, "ms_per_image": ms, "images": 3, "scores": {"CIDEr": cider},
            "dangling_share": 0.0, "oov_share": 0.0, "decode_s": ms * 3e-3}


def test_pareto_rows_front_and_merge(tmp_path):
    from ladic.bench import pareto

    names = [r.name for r in pareto.student_rows((1, 2), mbr=5)]
    assert names == ["student 1 step", "student 1 step + MBR 5", "student 2 steps", "student 2 steps + MBR 5",
                     "student 1 step, no end rule"]
    assert pareto.student_rows((1, 2), mbr=5)[-1].sampling == {**pareto.student_sampling(1), "no_dangling_end": False}
    assert all(r.sampling["guidance_scale"] == 0.0 and not r.sampling["clamp"] for r in pareto.student_rows())
    rerank = pareto.student_rows((1,), mbr=1, rerank=(5,), ar_path="ar-folder")
    assert [r.name for r in rerank] == ["student 1 step", "student 1 step, no end rule", "student 1 step x 5 + AR rerank"]
    assert rerank[2].sampling == {**pareto.student_sampling(1), "mbr_candidates": 5, "mbr_lengths": "top",
                                  "rerank_with": "ar-folder"}
    teacher = pareto.teacher_rows((5, 30))
    assert len(teacher) == 8 and {(r.sampling["back_and_refine"], r.sampling["clamp"]) for r in teacher} == {
        (True, True), (True, False), (False, True), (False, False)}
    assert [r.name for r in pareto.ar_rows(3)] == ["AR greedy", "AR beam 3"]

    rows = [_row("AR greedy", "ar", 30, 0.48), _row("student 1 step", "student", 20, 0.50),
            _row("teacher 5 steps, B&R, clamp", "teacher", 150, 0.49), _row("student 2 steps", "student", 40, 0.52)]
    assert pareto.pareto_front(rows) == {"student 1 step", "student 2 steps"}
    # A later run re-measures one row and adds none: the others are kept, in system order.
    merged = pareto.merge_rows(rows, [_row("student 1 step", "student", 25, 0.51)])
    assert [r["model"] for r in merged] == ["student", "student", "teacher", "ar"]
    assert next(r for r in merged if r["name"] == "student 1 step")["ms_per_image"] == 25

    meta = bench.run_meta({"what": ["pareto"]})
    pareto.write_pareto(merged, ["toy"], tmp_path, meta)
    _check_header(tmp_path, "pareto")
    assert pareto.read_rows(tmp_path / "pareto.json") == merged
    assert pareto.read_rows(tmp_path / "missing.json") == []
    md = (tmp_path / "pareto.md").read_text()
    assert "| student 2 steps | 40.0 |" in md and "| yes |" in md


def test_infill_table_tiny(tmp_path, tiny_model, scenes):
    from ladic.bench.infill import infill_markdown, infill_table
    from ladic.data.features import build_features

    caps = ["a dog is running on the grass", "two girls are playing in the park", "a red car parked"]
    records = [CaptionRecord(f"i{i}", "", [c] * 5, "val") for i, c in enumerate(caps)]
    feats = build_features(tiny_model, records, images=[s.image for s in scenes[:3]])
    systems = [("tiny 1 step", tiny_model, dict(num_inference_steps=1, guidance_scale=0.0, back_and_refine=False))]
    (row,) = infill_table(systems, feats, batch_size=2, log=lambda s: None)
    assert row["noun"]["n"] == 2 and row["verb"]["n"] == 2  # "a red car parked" has no probe word
    assert 0.0 <= row["noun"]["accuracy"] <= 1.0
    templates = [t for t, _, _ in row["verb"]["examples"]]
    assert templates == ["a dog is ___ on the grass", "two girls are ___ in the park"]
    md = infill_markdown([row], ["toy"], bench.run_meta({"what": ["infill"]}))
    assert "| tiny 1 step |" in md and "(n = 2)" in md


def test_memorise_table_tiny(tmp_path):
    """``ladic bench memorise`` trains each arm of an --arms file and writes its table (Flickr8k captions)."""
    from ladic.data.captions import require_flickr8k

    try:
        require_flickr8k()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    arms = tmp_path / "arms.json"
    arms.write_text(json.dumps({"fixed": {}, "unscaled": {"input_scaling": "none"}}))
    out = tmp_path / "mem"
    args = argparse.Namespace(what=["memorise"], out_dir=str(out), mem_preset="tiny", mem_photos=4, mem_steps=2,
                              arms=str(arms), threads=None)
    assert bench.bench_cli(args) == 0
    rows = json.loads((out / "memorise.json").read_text())["rows"]
    assert [r["arm"] for r in rows] == ["fixed", "unscaled"] and len(rows[0]["losses"]) == 2
    assert set(rows[0]["exact"]) == {"1", "5"} and all(0 <= v <= 1 for v in rows[0]["exact"].values())
    md = (out / "memorise.md").read_text()
    assert "| fixed | `{}` |" in md and '`{"input_scaling": "none"}`' in md and "sampling noise factor 1" in md
