"""``ladic bench`` command line: its options, one runner per subcommand writing its files, and the entry point.

Importing this module (and ``add_bench_arguments``) needs only the standard library: torch is imported when a
benchmark runs, so ``ladic --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ladic.bench.ablations import ABLATIONS, ablations_markdown, run_ablations
from ladic.bench.flops import flops_markdown, flops_plot, run_flops
from ladic.bench.latency import DEFAULT_LENGTHS, latency_markdown, latency_plot, run_latency
from ladic.bench.lengths import DEFAULT_BUCKET_EDGES, lengths_markdown, lengths_plot, lengths_table
from ladic.bench.quality import ladic_sampling, quality_rows, quality_table, write_quality
from ladic.bench.report import run_meta, write_outputs
from ladic.bench.session import Session
from ladic.bench.text_stats import stats_note

SUBCOMMANDS = ("latency", "flops", "quality", "lengths", "ablations", "curves", "pareto", "infill", "memorise")
ALL = ("latency", "flops", "quality", "lengths")  # ``all``: everything except the ablations, which train


def _ints(s: str | Sequence[int]) -> list[int]:
    if isinstance(s, str):
        return [int(x) for x in s.replace(" ", "").split(",") if x]
    return [int(x) for x in s]


def _floats(s: str | Sequence[float]) -> list[float]:
    if isinstance(s, str):
        return [float(x) for x in s.replace(" ", "").split(",") if x]
    return [float(x) for x in s]


def _bnr_modes(s: str) -> list[bool]:
    out = []
    for x in s.replace(" ", "").split(","):
        if x not in ("on", "off"):
            raise ValueError(f"--bnr takes on, off or on,off (got {s!r})")
        out.append(x == "on")
    return out


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ladic bench`` beyond those cli.py declares itself."""
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--preset", default="small", help="latency/flops: preset of the randomly initialised models")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="latency: caption lengths N")
    p.add_argument("--batch-sizes", default="1,64", help="latency: batch sizes")
    p.add_argument("--steps", default="1,5,30", help="latency: LaDiC denoising steps")
    p.add_argument("--bnr", default="on", help="latency: Back&Refine on, off or on,off (default on)")
    p.add_argument("--guidance", type=float, default=None, help="latency: LaDiC guidance w (default: preset's, 1.0)")
    p.add_argument("--beams", type=int, default=3, help="AR beam width of the beam rows (latency, quality, lengths)")
    p.add_argument("--modes", default="decoder,e2e", help="latency: decoder (precomputed image tokens) and/or e2e")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each timing")
    p.add_argument("--image-encoder", default=None, help="latency: image encoder of the timed models (default: the preset's)")
    p.add_argument("--restrict-vocab", action="store_true",
                   help="latency: restrict both LM heads to the word pieces of the Flickr8k train captions")
    p.add_argument("--flops-batch", type=int, default=64, help="flops: batch size")
    p.add_argument("--matmul-size", type=int, default=1024, help="flops: n of the n x n reference matmul")
    p.add_argument("--split", default="val", help="quality/lengths/ablations: Flickr8k split")
    p.add_argument("--grid", choices=("axes", "full"), default="axes",
                   help="quality: axes = one factor at a time per step count; full = all combinations")
    p.add_argument("--quality-steps", default="5,30", help="quality: LaDiC step counts")
    p.add_argument("--mbr", type=int, default=5, help="quality: MBR candidates of the MBR rows")
    p.add_argument("--guidances", default="0,1,2", help="quality: guidance weights")
    p.add_argument("--bert-score", action="store_true", help="quality: also BERT-Score (MiniLM; slow)")
    p.add_argument("--caption-batch", type=int, default=64, help="quality/lengths/ablations: images per batch")
    p.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKET_EDGES)),
                   help="lengths: upper edges of the mean-reference-length buckets in words (9,11,13: <=9 10-11 12-13 >=14)")
    p.add_argument("--work-dir", default=str(Path.home() / "ladic_runs" / "ablations"),
                   help="ablations: training folders (a variant with <dir>/final is not retrained)")
    p.add_argument("--max-steps", type=int, default=400, help="ablations: training steps per variant")
    p.add_argument("--train-images", type=int, default=2000, help="ablations: training images")
    p.add_argument("--variants", default=",".join(a.name for a in ABLATIONS), help="ablations: which variants")
    p.add_argument("--runs", default="", help="curves: comma-separated `ladic train` out_dirs")
    p.add_argument("--notes", default="", help="curves: a sentence for the table's notes (e.g. the recipe)")
    p.add_argument("--student", default=None, help="pareto/infill: the few-step student (default: the shipped one, the default model)")
    p.add_argument("--teacher", default=None, help="pareto/infill: the full-sampler model (default: the shipped one, --full)")
    p.add_argument("--systems", default="student,teacher,ar",
                   help="pareto: which systems to measure now (rows of the others already in --out-dir are kept)")
    p.add_argument("--student-steps", default="1,2", help="pareto: the student's step counts")
    p.add_argument("--rerank", default="", help="pareto: also the student's 1 step x k + AR rerank, for each k "
                                                "of this list (e.g. 5,10; default none)")
    p.add_argument("--teacher-steps", default="5,30", help="pareto: the teacher's step counts")
    p.add_argument("--mem-photos", type=int, default=32, help="memorise: photos (the first Flickr8k train captions)")
    p.add_argument("--mem-steps", type=int, default=100, help="memorise: training steps (every photo in every batch)")
    p.add_argument("--mem-preset", default="small", help="memorise: preset of the fresh models (noise factor 4)")
    p.add_argument("--arms", default="", help="memorise: a JSON file {arm name: config overrides} "
                                              "(default: issue 28's input-scaling / position-init separation)")
    p.add_argument("--progress", action="store_true", help="progress bars")


def _cmd_latency(args: argparse.Namespace, session: Session, out_dir: Path) -> list[Path]:
    meta = run_meta(vars(args))
    vocab = None
    if args.restrict_vocab:
        from ladic.text_space import TextSpace

        text = TextSpace()
        vocab = text.tokenize([c for r in session.train_records() for c in r.captions])["input_ids"]
    res = run_latency(preset_name=args.preset, lengths=_ints(args.lengths), batch_sizes=_ints(args.batch_sizes),
                      steps=_ints(args.steps), bnr=_bnr_modes(args.bnr), beams=args.beams, guidance=args.guidance,
                      modes=[m for m in args.modes.split(",") if m], repeats=args.repeats, warmup=args.warmup,
                      device=args.device, image_encoder=args.image_encoder, output_vocab=vocab)
    return write_outputs(out_dir, "latency", meta, res, lambda: latency_markdown(res, meta),
                         lambda path: latency_plot(res, path, meta))


def _cmd_flops(args: argparse.Namespace, session: Session, out_dir: Path) -> list[Path]:
    meta = run_meta(vars(args))
    res = run_flops(preset_name=args.preset, batch=args.flops_batch, repeats=args.repeats, warmup=args.warmup,
                    device=args.device, matmul_size=args.matmul_size)
    return write_outputs(out_dir, "flops", meta, res, lambda: flops_markdown(res, meta),
                         lambda path: flops_plot(res, path, meta))


def _cmd_quality(args: argparse.Namespace, session: Session, out_dir: Path) -> list[Path]:
    meta = run_meta(vars(args))
    models = {"ladic": session.ladic(), "ar": session.ar()}
    rows = quality_rows(args.grid, _ints(args.quality_steps), args.mbr, _floats(args.guidances), args.beams,
                        ar=models["ar"] is not None)
    table = quality_table(models, session.records(), rows, batch_size=args.caption_batch, bert_score=args.bert_score,
                          memo=session.memo, progress=args.progress, train_text=session.train_text())
    notes = session.data_notes() + [
        "Scores x100 from `ladic.metrics.coco_metrics` (pycocoevalcap; CIDEr = CIDEr-D). "
        + ("BERT-Score: MiniLM (not the paper's roberta-large)." if args.bert_score else "BERT-Score off."),
        "Decode seconds: `ladic.evaluate.caption_split` (from cached image features, so image encoding is not "
        f"included), batch {args.caption_batch}, device {args.device}; seed 0. B&R = Back&Refine; MBR k draws k "
        "captions per image and keeps the minimum-Bayes-risk one; w = classifier-free guidance weight.",
        stats_note(session.train_text() is not None),
    ]
    return write_quality(table, notes, out_dir, meta)


def _lengths_systems(session: Session, beams: int) -> list[tuple[str, Any, dict[str, Any]]]:
    m = session.ladic()
    cfg = m.config
    systems = [(f"LaDiC {cfg.num_inference_steps} steps" + (", B&R" if cfg.back_and_refine else ""), m,
                ladic_sampling(cfg.num_inference_steps, cfg.back_and_refine, 1, cfg.guidance_scale))]
    ar = session.ar()
    if ar is not None:
        systems.append(("AR greedy", ar, {"num_beams": 1}))
        if beams > 1:
            systems.append((f"AR beam {beams}", ar, {"num_beams": beams}))
    return systems


def _cmd_lengths(args: argparse.Namespace, session: Session, out_dir: Path) -> list[Path]:
    meta = run_meta(vars(args))
    res = lengths_table(_lengths_systems(session, args.beams), session.records(), _ints(args.buckets),
                        batch_size=args.caption_batch, memo=session.memo, progress=args.progress,
                        train_text=session.train_text())
    notes = session.data_notes() + [
        "Images are bucketed by the mean length (words, after the data set's caption cleaning) of their 5 "
        "references, rounded to the nearest integer. BLEU-4 is corpus BLEU-4 over each bucket "
        "(pycocoevalcap Bleu after the PTB tokenizer, as `coco_metrics`), x100.",
        "LaDiC uses the model's default sampling (steps, Back&Refine, guidance as in its config), seed 0.",
        stats_note(session.train_text() is not None),
    ]
    return write_outputs(out_dir, "lengths", meta, {"notes": notes, **res},
                         lambda: lengths_markdown(res, notes, meta), lambda path: lengths_plot(res, path, meta))


def _cmd_ablations(args: argparse.Namespace, session: Session, out_dir: Path) -> list[Path]:
    meta = run_meta(vars(args))
    wanted = [v for v in args.variants.replace(" ", "").split(",") if v]
    known = {a.name: a for a in ABLATIONS}
    bad = [v for v in wanted if v not in known]
    if bad:
        raise ValueError(f"unknown ablation variant(s) {', '.join(bad)}; choose from {', '.join(known)}")
    chosen = [known[v] for v in wanted]
    if any(a.model is None for a in chosen) and "full" not in wanted:
        chosen.insert(0, known["full"])
    res = run_ablations(session.records(), Path(args.work_dir).expanduser(), ablations=chosen,
                        max_steps=args.max_steps, train_images=args.train_images, caption_batch=args.caption_batch,
                        progress=args.progress)
    notes = session.data_notes()[:1] + [
        f"Each variant: `ladic.train.train` with preset small, Flickr8k train (first {args.train_images} images), "
        f"{args.max_steps} steps, batch 64, seed 0, no validation; folders under {args.work_dir} "
        "(a variant whose `final` exists is not retrained; an interrupted one resumes from its checkpoint).",
        "Evaluation: 5 denoising steps (model defaults otherwise: guidance 1.0, Back&Refine on unless the row "
        "turns it off), seed 0; scores x100 from `coco_metrics`.",
    ]
    return write_outputs(out_dir, "ablations", meta, {"notes": notes, **res},
                         lambda: ablations_markdown(res, notes, meta))


def _cmd_curves(args: argparse.Namespace, session: Session, out_dir: Path) -> list[Path]:
    from ladic.bench.curves import curves_markdown, curves_plot, read_curve

    meta = run_meta(vars(args))
    runs = [r for r in args.runs.split(",") if r]
    if not runs:
        raise ValueError("bench curves needs --runs dir1,dir2,...")
    curves = [read_curve(Path(r).expanduser()) for r in runs]
    notes = ([args.notes] if args.notes else []) + [
        "Validation as `ladic train` logs it (EMA weights, the run's val_images / val_steps); scores x100."]
    return write_outputs(out_dir, "curves", meta, {"curves": curves}, lambda: curves_markdown(curves, notes, meta),
                         lambda path: curves_plot(curves, path, meta))


def _cmd_pareto(args: argparse.Namespace, session: Session, out_dir: Path) -> list[Path]:
    import time

    from ladic.bench.pareto import SYSTEMS, ar_rows, merge_rows, read_rows, student_rows, teacher_rows, write_pareto

    meta = run_meta(vars(args))
    systems = [x for x in args.systems.replace(" ", "").split(",") if x]
    bad = [x for x in systems if x not in SYSTEMS]
    if bad:
        raise ValueError(f"unknown system(s) {', '.join(bad)}; choose from {', '.join(SYSTEMS)}")
    models: dict[str, Any] = {}
    rows = []
    if "student" in systems:
        models["student"] = session.student()
        rows += student_rows(_ints(args.student_steps), args.mbr, _ints(args.rerank), str(session.ar_path() or "shipped"))
    if "teacher" in systems:
        models["teacher"] = session.teacher()
        rows += teacher_rows(_ints(args.teacher_steps), models["teacher"].config.guidance_scale)
    if "ar" in systems and session.ar() is not None:
        models["ar"] = session.ar()
        rows += ar_rows(args.beams)
    new = quality_table(models, session.records(), rows, batch_size=args.caption_batch, memo=session.memo,
                        progress=args.progress, train_text=session.train_text())
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    for r in new:
        r["measured"] = stamp
    merged = merge_rows(read_rows(out_dir / "pareto.json"), new)
    notes = session.data_notes()[:1] + [
        f"Student: {args.student or 'the shipped one-step student'}; teacher: {args.teacher or 'the shipped full-sampler model'}; "
        f"AR: {session.ar_path() or 'none'}.",
        "ms / image: decoding only (`ladic.evaluate.caption_split` from cached image tokens, image encoding "
        f"excluded), batch {args.caption_batch}, seed 0, torch threads {args.threads or 'default'}. Rows measured in "
        "separate runs (the measured column) ran on the same machine with the same thread count.",
        "Scores x100 (pycocoevalcap; CIDEr = CIDEr-D). B&R = Back&Refine; MBR k keeps the minimum-Bayes-risk "
        "caption of k draws; the student samples without guidance, B&R or clamping.",
        stats_note(session.train_text() is not None),
    ] + (["x k + AR rerank: k one-step draws at the k most likely lengths, of which the AR baseline's length-"
          "normalised log-likelihood (one teacher-forced pass over the k, timed) picks one (noisy parallel decoding)."]
         if any("rerank_with" in r["sampling"] for r in merged) else [])
    return write_pareto(merged, notes, out_dir, meta)


def _cmd_infill(args: argparse.Namespace, session: Session, out_dir: Path) -> list[Path]:
    from ladic.bench.infill import infill_markdown, infill_table
    from ladic.bench.pareto import student_name, student_sampling
    from ladic.data.features import build_features
    from ladic.evaluate import feature_cache_dir

    meta = run_meta(vars(args))
    student, teacher = session.student(), session.teacher()
    feats = build_features(student, session.records(), feature_cache_dir(), progress=args.progress)
    systems = [(student_name(s), student, student_sampling(s)) for s in _ints(args.student_steps)]
    systems.append(("teacher, full sampler (its config)", teacher, {"seed": 0}))
    rows = infill_table(systems, feats, batch_size=args.caption_batch)
    notes = session.data_notes()[:1] + [
        "Each image's first reference loses one word: the subject's head noun or the main verb of a "
        "'<subject> is/are <verb>ing' caption (`ladic.evaluate.infill_probe`; references without one, or whose "
        "word is more than one word piece, are skipped). The model fills the blank (`generate(template=...)`); "
        "a hit is the exact removed word.",
        f"Student: {args.student or 'the shipped one-step student'}; teacher: {args.teacher or 'the shipped full-sampler model'}.",
    ]
    return write_outputs(out_dir, "infill", meta, {"notes": notes, "rows": rows},
                         lambda: infill_markdown(rows, notes, meta))


def _sampler_words(cfg) -> str:
    """The sampler settings of a config in words, for a table's notes."""
    f = cfg.sampling_noise_factor or cfg.noise_factor
    return (f"w = {cfg.guidance_scale:g}, Back&Refine {'on' if cfg.back_and_refine else 'off'}, sampling noise factor "
            f"{f:g}, clamping {'on' if cfg.clamp else 'off'}, at 1 step and at {cfg.num_inference_steps} steps")


def _cmd_memorise(args: argparse.Namespace, session: Session, out_dir: Path) -> list[Path]:
    import json

    from ladic.bench.memorise import ARMS, memorisation_test, memorise_markdown
    from ladic.config import preset

    meta = run_meta(vars(args))
    arms = json.loads(Path(args.arms).read_text()) if args.arms else ARMS
    captions = [r.captions[0] for r in session.train_records()[: args.mem_photos]]
    rows = []
    for name, overrides in arms.items():
        cfg = preset(args.mem_preset, **{"noise_factor": 4.0, **overrides})
        r = memorisation_test(cfg, captions, steps=args.mem_steps, progress=args.progress)
        rows.append({"arm": name, "overrides": overrides, "exact": {str(k): v for k, v in r.exact.items()},
                     "restore": {str(k): v for k, v in r.restore.items()}, "losses": r.losses, "samples": r.samples,
                     "seconds": r.seconds})
        print(f"memorise: {name}: exact {r.exact}, restore {r.restore}", file=sys.stderr)
    notes = [f"`ladic.bench.memorise.memorisation_test`: a fresh `{args.mem_preset}` LaDiC (noise factor 4, output "
             f"vocabulary restricted to the captions' word pieces) trained on the first caption of the first "
             f"{len(captions)} Flickr8k train photos, each photo a fixed random image-token "
             f"tensor, all {len(captions)} in every batch, AdamW lr 8e-4, {args.mem_steps} steps, seed 0.",
             "exact: share of photos whose sampled caption (seed 0, the model's default sampler: "
             f"{_sampler_words(preset(args.mem_preset, noise_factor=4.0))}) equals its training caption; restore: "
             "word-token accuracy of one conditional denoiser call on x_t ~ q(x_t | x0), no self-conditioning."]
    return write_outputs(out_dir, "memorise", meta, {"notes": notes, "rows": rows},
                         lambda: memorise_markdown(rows, notes, meta))


RUNNERS = {"infill": _cmd_infill, "pareto": _cmd_pareto, "latency": _cmd_latency, "flops": _cmd_flops, "quality": _cmd_quality, "lengths": _cmd_lengths,
           "ablations": _cmd_ablations, "curves": _cmd_curves, "memorise": _cmd_memorise}


def bench_cli(args: argparse.Namespace) -> int:
    """Entry point of ``ladic bench``."""
    what: list[str] = []
    for w in args.what or ["latency"]:
        names = ALL if w == "all" else (w,)
        for n in names:
            if n not in RUNNERS:
                print(f"error: unknown benchmark {w!r}; choose from {', '.join(SUBCOMMANDS)} or all", file=sys.stderr)
                return 2
            if n not in what:
                what.append(n)
    # Options that cli.py may not declare (when called with a bare Namespace): fill in the defaults.
    defaults = argparse.ArgumentParser(add_help=False)
    add_bench_arguments(defaults)
    for k, v in vars(defaults.parse_args([])).items():
        if not hasattr(args, k):
            setattr(args, k, v)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    session = Session(args)
    failed = 0
    for name in what:
        try:
            paths = RUNNERS[name](args, session, out_dir)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            print(f"error: bench {name}: {' '.join(str(e).split())}", file=sys.stderr)
            failed += 1
            continue
        print(f"bench {name}: wrote " + ", ".join(str(p) for p in paths))
    return 2 if failed else 0

