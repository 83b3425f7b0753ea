"""``ladic`` command line: caption | infill | train | export | eval | bench | demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

EXAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "hubble_deep_field", "immunohistochemistry")


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


class UsageError(ValueError):
    """A bad option value: one ``error:`` line, exit code 2."""


def _check_options(args: argparse.Namespace) -> None:
    """Ranges of the sampling and collection options that need no model (before anything loads)."""
    checks = [("steps", 1, "denoising iterations"), ("mbr", 1, "candidates"), ("batch_size", 1, "images per batch"),
              ("workers", 0, "decoding processes"), ("length", 1, "word pieces"), ("limit", 1, "images")]
    for name, low, what in checks if args.command in ("caption", "infill", "eval") else ():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low} ({what}), got {value}")
    if getattr(args, "runtime", "torch") == "onnx":
        given = [flag for flag, value in (("--steps", args.steps not in (None, 1)), ("--guidance", args.guidance),
                                          ("--back-and-refine", args.back_and_refine), ("--mbr", args.mbr not in (None, 1)),
                                          ("--select", args.select),
                                          ("--mbr-lengths", args.mbr_lengths), ("--length", args.length),
                                          ("--trajectory", args.trajectory), ("--rerank", args.rerank),
                                          ("--clamp" if args.clamp else "--no-clamp", args.clamp is not None), ("--device", args.device != "cpu"),
                                          ("--full", args.full)) if value not in (None, False)]
        if given:
            raise UsageError(f"--runtime onnx samples as exported (one step, on the CPU); drop {', '.join(given)}")
    if args.command == "demo":
        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port must be in 0..65535 (0 picks a free port), got {args.port}")
        if not args.max_request_seconds > 0 or args.max_request_seconds == float("inf"):
            raise UsageError(f"--max-request-seconds must be a positive number, got {args.max_request_seconds}")
    guidance = getattr(args, "guidance", None)
    if guidance is not None and guidance < 0:
        raise UsageError(f"--guidance must be >= 0 (0 turns guidance off), got {guidance}")
    device = getattr(args, "device", None)
    if device is not None and device != "cpu":
        import torch

        try:
            kind = torch.device(device).type
        except RuntimeError as e:
            raise UsageError(f"--device {device}: not a device ({' '.join(str(e).split())[:80]})") from e
        if kind == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch build has no CUDA device available; use --device cpu")


def _check_against_model(args: argparse.Namespace, model) -> None:
    """The options whose range depends on the loaded model's config."""
    cfg = model.config
    length = getattr(args, "length", None)
    if length is not None and hasattr(model, "diffuser") and length > cfg.max_length - 2:
        raise UsageError(f"--length must be at most {cfg.max_length - 2} word pieces for this model, got {length}")
    p99 = getattr(cfg, "trained_length_p99", 0)
    if length is not None and p99 and length > p99:
        print(f"warning: --length {length} is longer than 99 % of this model's training captions (at most {p99} word "
              f"pieces): expect a broken sentence", file=sys.stderr)
    steps = getattr(args, "steps", None)
    if steps is not None and hasattr(model, "diffuser") and steps > cfg.num_train_timesteps:
        raise UsageError(f"--steps must be at most {cfg.num_train_timesteps} for this model, got {steps}")


def _load_model(path: str | None, device: str, args: argparse.Namespace | None = None):
    from ladic.models import load_model

    model = load_model(path, device=device)
    if args is not None:
        _check_against_model(args, model)
    return model


def _load_onnx(path: str | None):
    from ladic.onnx_export import ExportError, onnx_captioner

    try:
        return onnx_captioner(path)
    except ExportError as e:
        raise UsageError(f"--runtime onnx: {e}") from None


def _sampling_kwargs(args: argparse.Namespace, model=None) -> dict:
    drafts = args.mbr if args.mbr is not None else getattr(getattr(model, "config", None), "num_candidates", 1)
    if args.rerank and model is not None and drafts < 2:
        raise UsageError("--rerank chooses among candidates; give --mbr K with K >= 2")
    kwargs = dict(
        num_inference_steps=args.steps, guidance_scale=args.guidance, back_and_refine=args.back_and_refine,
        mbr_candidates=args.mbr, seed=args.seed, clamp=args.clamp, mbr_lengths=args.mbr_lengths, select=args.select,
    )
    if args.rerank:
        from ladic.baselines.ar import load_reranker

        kwargs["rerank_with"] = load_reranker(args.rerank_model, args.device)
    return kwargs


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder or Hugging Face Hub id org/name (default: the shipped model)")
    p.add_argument("--full", action="store_true",
                   help="the shipped full-sampler model (5 steps, Back&Refine, clamping, guidance) instead of the "
                        "default one-step student: about 12x the decoding time, 2 CIDEr more on Flickr8k val")
    p.add_argument("--fast", action="store_true",
                   help="the shipped one-step student (the default; for scripts that name it)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    p.add_argument("--steps", type=int, default=None, help="denoising iterations (default: the model's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance weight w (default: the model's)")
    p.add_argument("--back-and-refine", action=argparse.BooleanOptionalAction, default=None,
                   help="Back&Refine at t = T/2 (default: the model's)")
    p.add_argument("--mbr", type=int, default=None,
                   help="draft this many candidate captions per image and keep one (--select; default: the model's, 1 = "
                        "a single draft)")
    p.add_argument("--select", choices=("mbr", "likelihood"), default=None,
                   help="how one of the --mbr drafts is kept: mbr (the most similar to the others) or likelihood (the "
                        "one the model itself reconstructs best from noise) (default: the model's)")
    p.add_argument("--mbr-lengths", choices=("top", "predicted"), default=None,
                   help="length-conditioned models: candidate j at the j-th most likely length (top) or all at the "
                        "most likely one (predicted) (default: the model's)")
    p.add_argument("--rerank", action="store_true",
                   help="of the --mbr candidates, take the one the AR baseline finds most likely instead of the MBR "
                        "choice (noisy parallel decoding)")
    p.add_argument("--rerank-model", default="shipped", metavar="DIR",
                   help="the AR model that --rerank scores with (default: the shipped baseline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=None,
                   help="snap intermediate estimates to decoded-token latents (default from the model config)")
    p.add_argument("--device", default="cpu")


def _example_images() -> list[tuple[str, object]]:
    import skimage.data

    return [(name, skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)())
            for name in EXAMPLES]


def _collect_photos(args: argparse.Namespace, show_notes: bool) -> tuple[list, list[str], int]:
    """The photos to caption (input order, each file once), the paths that failed to list, and how many entries of
    the given folders were left out (not image files; each gets a ``note:`` line)."""
    from ladic.collection import Photo, unique_image_ids
    from ladic.image_io import iter_image_files

    photos: dict[str, Photo] = {}
    errors: list[str] = []
    left_out = 0
    if args.examples:
        for name, img in _example_images():
            photos[f"skimage.data.{name}"] = Photo(name, f"skimage.data.{name}", img)
    for p in args.paths:
        files, errs = iter_image_files(p, recursive=args.recursive)
        errors += [str(e) for e in errs if "skipped" not in e.reason or Path(p).is_file()]
        for e in errs:
            if "skipped" in e.reason and not Path(p).is_file():
                left_out += 1
                if show_notes:
                    print(f"note: {e}", file=sys.stderr)
        for f in files:
            photos.setdefault(str(f), Photo.from_path(f))
    return unique_image_ids(list(photos.values())), errors, left_out


class _Processes:
    """This process's rank and the world size under torchrun (RANK / WORLD_SIZE), with gloo collectives."""

    def __init__(self) -> None:
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def start(self) -> None:
        if self.world > 1:
            from datetime import timedelta

            import torch.distributed as dist

            if not dist.is_initialized():  # a rank waits at the end for the slowest one, however long
                dist.init_process_group("gloo", timeout=timedelta(days=7))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: list[int]) -> list[int]:
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.long)
        dist.all_reduce(t)
        return t.tolist()

    def stop(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _device(args: argparse.Namespace, procs: _Processes) -> str:
    return f"cuda:{procs.local_rank}" if args.device == "cuda" and procs.world > 1 else args.device


def cmd_caption(args: argparse.Namespace) -> int:
    procs = _Processes()
    if procs.world > 1 and not args.out:  # (said once, by rank 0; torchrun then reports the failed processes)
        if procs.rank == 0:
            print("error: --out is required with several processes (torchrun): they write no captions to stdout",
                  file=sys.stderr)
        return 2
    if args.resume and not args.out:
        print("error: --resume needs --out", file=sys.stderr)
        return 2
    if args.resume and args.overwrite:
        print("error: --resume continues a results file and --overwrite replaces it; give one", file=sys.stderr)
        return 2
    if args.out:
        from ladic.results_file import ResultsFileError, check_settings

        try:
            if not args.overwrite:
                check_settings(Path(args.out), _run_settings(args), args.resume)
        except ResultsFileError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    photos, errors, left_out = _collect_photos(args, show_notes=procs.rank == 0)
    if not photos and not errors:
        print("error: no images given (pass files or folders, or --examples)", file=sys.stderr)
        return 2
    procs.start()
    try:
        return _caption_collection(args, photos, errors if procs.rank == 0 else [], procs, left_out)
    finally:
        procs.stop()


def _run_settings(args: argparse.Namespace) -> dict:
    """The model and every option that changes a caption, as recorded beside a results file."""
    from ladic.captioner import default_model_path

    model = args.model or str(default_model_path())
    if Path(model).exists():
        model = str(Path(model).resolve())
    return {"model": model, "steps": args.steps, "guidance": args.guidance, "back_and_refine": args.back_and_refine,
            "mbr": args.mbr, "select": args.select, "mbr_lengths": args.mbr_lengths, "seed": args.seed, "clamp": args.clamp,
            "length": args.length, "rerank": args.rerank_model if args.rerank else None}  # not the runtime: same captions


def _caption_collection(args: argparse.Namespace, photos: list, errors: list[str], procs: _Processes,
                        left_out: int = 0) -> int:
    """Caption this process's shard of ``photos``, streaming results to stdout and ``--out``."""
    import time

    from tqdm.auto import tqdm

    from ladic.collection import CollectionConfig, PipelineStats, caption_batches, shard
    from ladic.results_file import ResultsFileError, ResultsStore

    start = time.perf_counter()
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    store = ResultsStore(Path(args.out), procs.rank, procs.world) if args.out else None
    try:
        done = store.done(args.resume) if store else set()
    except ResultsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    procs.barrier()  # every process has read what is done before any writes
    if store:
        store.open(args.resume)
        if procs.rank == 0:
            from ladic.results_file import write_settings

            write_settings(Path(args.out), _run_settings(args))
    mine = shard(photos, procs.rank, procs.world)
    todo = [p for p in mine if p.file not in done]
    counts = {"captioned": 0, "failed": 0}
    stats = PipelineStats()
    show = procs.world == 1
    if todo:
        _quiet_transformers()
        model = _load_onnx(args.model) if args.runtime == "onnx" else _load_model(args.model, _device(args, procs), args)
        config = CollectionConfig(batch_size=args.batch_size, num_workers=args.workers, draft=args.draft)
        bar = tqdm(total=len(todo), unit="photo", desc="captioning", dynamic_ncols=True,
                   disable=True if procs.rank else None if args.progress is None else not args.progress)
        batches = caption_batches(model, todo, config=config, stats=stats, length=args.length,
                                  return_trajectory=args.trajectory, **_sampling_kwargs(args, model))
        for batch in batches:
            for r in batch:
                if r.error is not None:
                    bar.write(f"error: {r.error}", file=sys.stderr)
                    continue
                if show:
                    bar.write(f"{r.photo.file}\t{r.caption}", file=sys.stdout)
                    for step, text in enumerate(r.trajectory or []):
                        bar.write(f"  step {step + 1}: {text}", file=sys.stdout)
            if store:
                store.append([r.record() for r in batch if r.error is None])
            counts["captioned"] += sum(r.error is None for r in batch)
            counts["failed"] += sum(r.error is not None for r in batch)
            bar.update(len(batch))
        bar.close()
    if store:
        store.close()
    procs.barrier()
    captioned, failed, kept = procs.sum([counts["captioned"], counts["failed"] + len(errors), len(mine) - len(todo)])
    if store and procs.rank == 0:
        store.finalize({p.file: i for i, p in enumerate(photos)}, args.resume)
    if procs.rank == 0:
        seconds = time.perf_counter() - start
        also = f", {kept} already in {args.out}" if args.resume else ""
        also += f", {left_out} not image files (see the notes)" if left_out else ""
        print(f"captioned {captioned}, failed {failed}{also} in {seconds:.1f} s"
              f" ({captioned / seconds:.2f} photos/s; main process: waiting for photos {stats.waiting_for_photos:.1f} s,"
              f" encoding {stats.encoding:.1f} s, captioning {stats.captioning:.1f} s)", file=sys.stderr)
        if failed:
            print(f"{failed} of {failed + captioned + kept} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_infill(args: argparse.Namespace) -> int:
    from ladic.image_io import ImageLoadError, load_image

    try:
        image = load_image(args.image)
    except ImageLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _quiet_transformers()
    model = _load_model(args.model, args.device, args)
    try:
        out = model.generate([image], template=args.template, **_sampling_kwargs(args, model))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out.captions[0])
    for i, cap in enumerate(out.candidates[0] if out.candidates else [], start=1):
        print(f"  candidate {i}: {cap}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ladic.checkpoint import CheckpointError
    from ladic.train import ConfigError, TrainConfig, TrainingDiverged, train

    _quiet_transformers()
    overrides = list(args.set or [])
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    try:
        tc = TrainConfig.load(args.config, overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    try:
        final = train(tc, resume=args.resume)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model written to {final}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from ladic.data.shards import STORAGE_DTYPES, write_features
    from ladic.data.sources import CaptionSource, DataError
    from ladic.image_encoders import EncoderLoadError
    from ladic.models import model_class
    from ladic.train import ConfigError, TrainConfig, init_distributed, model_config

    _quiet_transformers()
    if args.dtype not in STORAGE_DTYPES:
        raise UsageError(f"--dtype {args.dtype}: choose from {', '.join(STORAGE_DTYPES)}")
    if args.shard_size < 1 or args.batch_size < 1:
        raise UsageError("--shard-size and --batch-size must be >= 1")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"{args.out}: a file, not a folder; give a folder for the shards")
    try:
        tc = TrainConfig.load(args.config, list(args.set or []) + ["features_dir=null"])  # (the folder being made)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if tc.data == "scenes":
        raise UsageError("ladic features reads caption files or webdataset shards, not data=scenes")
    d, device = init_distributed(tc.dist_timeout_s)
    try:
        source = CaptionSource(tc.data, tc.image_root, tc.train_split, shard_size=args.shard_size,
                               image_column=tc.image_column, caption_column=tc.caption_column)
        model = model_class(tc.model_type)(model_config(tc)).to(device).eval()
        if not model.image_encoder.pretrained:
            raise UsageError(f"image encoder {model.image_encoder.name} is trained with the model: its features "
                             f"cannot be cached")
        res = write_features(model, source, args.out, dtype=args.dtype, batch_size=args.batch_size,
                             draft=not args.no_draft, max_bad_share=tc.max_bad_share, progress=d.main)
    except (DataError, EncoderLoadError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"rank {d.rank}: {res.written} shards written, {res.already} already in {args.out}"
          + (f"; {res.bad.summary()}" if res.bad.skipped else "") + f" (peak memory {peak:.0f} MB)")
    if d.main:
        print(f"train from them with: ladic train --config {args.config or '...'} --set features_dir={args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil

    import torch
    from safetensors.torch import load_file

    from ladic.checkpoint import CONFIG_NAME
    from ladic.models import load_model, model_class
    from ladic.train import ConfigError, TrainConfig, checkpoint_model_config

    _quiet_transformers()
    src = Path(args.checkpoint)
    if args.restrict_vocab and args.restrict_vocab != "flickr8k" and not Path(args.restrict_vocab).is_file():
        raise UsageError(f"--restrict-vocab {args.restrict_vocab}: not 'flickr8k' or a caption JSON file")
    if not src.is_dir():
        raise UsageError(f"{src}: no such folder")
    if (args.int8 or args.web) and not args.onnx:
        raise UsageError("--int8 and --web apply to --onnx exports")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: a file, not a folder; export into a new folder")
    if out.exists() and out.resolve() == src.resolve():
        raise UsageError(f"{out}: that is the folder being exported; export into another folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out}: exists and is not empty; give --overwrite to replace it")
    if args.onnx and (args.fp16 or args.raw):
        raise UsageError("--onnx writes fp32 graphs of the folder's weights; --fp16 and --raw do not apply to it yet")
    if (src / CONFIG_NAME).is_file():  # a model folder: re-export it (e.g. with a restricted vocabulary)
        model, what = load_model(src), "weights"
    elif not (src / "train_config.json").is_file():
        raise UsageError(f"{src}: neither a model folder ({CONFIG_NAME}) nor a training checkpoint (train_config.json); "
                         f"a training run's is <out_dir>/checkpoint")
    else:
        try:
            tc = TrainConfig.from_saved(json.loads((src / "train_config.json").read_text()))
        except ConfigError as e:
            raise UsageError(f"{src / 'train_config.json'}: {e}") from None
        model = model_class(tc.model_type)(checkpoint_model_config(src, tc).replace(output_vocab_size=0))
        stats = json.loads((src / "latent_stats.json").read_text())
        model.text.latent_mean.copy_(torch.tensor(stats["mean"]))
        model.text.latent_std.copy_(torch.tensor(stats["std"]))
        model.load_trainable_state_dict(load_file(str(src / ("weights.safetensors" if args.raw else "ema.safetensors"))))
        what = "raw weights" if args.raw else "EMA weights"
    if args.restrict_vocab:
        from ladic.data.captions import load_captions, load_flickr8k

        if args.restrict_vocab == "flickr8k":
            records = load_flickr8k("train")
        else:
            records = load_captions(args.restrict_vocab, args.image_root or ".", "train")
        captions = [c for r in records for c in r.captions]
        model.restrict_output_vocab(model.text.tokenize(captions)["input_ids"])
        what += f", output vocabulary restricted to the {model.text.output_vocab_size} word pieces of {len(captions)} training captions"
    if args.overwrite and out.is_dir():
        shutil.rmtree(out)
    if args.onnx:
        from ladic.onnx_export import ExportError, export_onnx, write_web_page

        try:
            if args.web:
                write_web_page(args.out, export_onnx(model.float(), Path(args.out) / "model", int8=args.int8))
            else:
                export_onnx(model.float(), args.out, int8=args.int8)
        except ExportError as e:
            if out.is_dir() and not any(out.rglob("*.onnx")):  # a refused export leaves no folder behind
                shutil.rmtree(out)
            raise UsageError(f"{src}: {e}") from None
        print(f"exported {what} of {src} as ONNX to {args.out}" + (" with the in-browser page (index.html)" if args.web else ""))
        return 0
    model.save_pretrained(args.out, dtype=torch.float16 if args.fp16 else None)
    print(f"exported {what} of {src} to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ladic.evaluate import evaluate_cli

    _quiet_transformers()
    return evaluate_cli(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from ladic.bench import bench_cli

    _quiet_transformers()
    return bench_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from ladic.demo import serve

    _quiet_transformers()
    serve(model_path=args.model, host=args.host, port=args.port, device=args.device,
          max_request_seconds=args.max_request_seconds)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (``error: ...``, exit code 2) instead of the usage block; ``--help`` has
    the usage. Sub-command parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ladic import __version__

    ap = _Parser(prog="ladic", description="LaDiC: latent diffusion image captioning")
    ap.add_argument("--version", action="version", version=f"ladic {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption image files or folders")
    p.add_argument("paths", nargs="*", help="image files or folders")
    p.add_argument("--examples", action="store_true", help="caption the sample photos shipped with scikit-image")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="onnx: run the model through ONNX Runtime (a one-step model; a model folder is exported to ONNX "
                        "once, into the cache; a folder from 'ladic export --onnx' is used as is); same captions")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--length", type=int, default=None, help="ask for captions of exactly N word pieces")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--trajectory", action="store_true", help="also print the caption after every denoising step")
    p.add_argument("--out", help="results file: .jsonl (one JSON object per photo, written batch by batch) "
                   "or .json (COCO results [{image_id, file, caption}])")
    p.add_argument("--resume", action="store_true", help="skip the photos already in --out (after a crash or kill)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (refused without this or --resume)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: one per available core, at most 4; 0 decodes in-process)")
    p.add_argument("--draft", action=argparse.BooleanOptionalAction, default=True,
                   help="decode JPEGs at a reduced scale still >= the encoder's input size (default on)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar with photos/s and ETA on stderr (default: when stderr is a terminal)")
    _add_sampling(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("infill", help="fill the blanks of a caption template for an image")
    p.add_argument("image")
    p.add_argument("template", help="e.g. 'two ___ standing on a ___ field' (one blank = one token)")
    _add_sampling(p)
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("train", help="train a model (torchrun for several processes)")
    p.add_argument("--config", help="JSON or TOML file with TrainConfig fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field (model.X for the model config)")
    p.add_argument("--out-dir")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("features", help="encode a training set into a sharded feature folder (torchrun: one share per "
                                        "process; rerun to resume)")
    p.add_argument("out", help="the features folder (train with --set features_dir=OUT)")
    p.add_argument("--config", help="the training config (its data, image_root, train_split and model are used)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training config field")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="images per shard of a caption file, lines per shard of a JSONL/CSV (default 1000); one "
                        "shard per tar file for webdataset shards")
    p.add_argument("--dtype", default="float16", help="storage dtype: float16 (default), bfloat16 or float32")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--no-draft", action="store_true",
                   help="decode JPEGs at full size (default: Pillow's draft mode, as ladic caption)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("export", help="write a training checkpoint's EMA weights (or a model folder) as a model folder")
    p.add_argument("checkpoint", help="<out_dir>/checkpoint of a training run, or a model folder")
    p.add_argument("out")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (refused otherwise)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--restrict-vocab", metavar="DATA",
                   help="let the LM head score only the word pieces of DATA's train captions ('flickr8k' or a "
                        "Karpathy/BLIP caption JSON): same captions, a fraction of the output layer's cost")
    p.add_argument("--image-root", help="image folder of a caption JSON (only its captions are read)")
    p.add_argument("--onnx", action="store_true",
                   help="write ONNX graphs instead (a one-step model such as the shipped default): image_encoder.onnx, "
                        "captioner.onnx, the tokenizer and onnx_config.json, for ONNX Runtime (ladic.onnx_export)")
    p.add_argument("--web", action="store_true",
                   help="with --onnx: write a static page that captions in the browser (OUT/index.html, OUT/ort, "
                        "OUT/model; serve OUT with any static file server)")
    p.add_argument("--int8", action="store_true", help="with --onnx: the smaller download, int8 matrix weights in the "
                                                       "captioner graph (about a quarter of its size; captions change) "
                                                       "and the image encoder's weights stored as fp16")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="caption metrics for a results file or a model on a dataset split")
    p.add_argument("--results", help="COCO results JSON [{image_id, caption}]")
    p.add_argument("--references", help="COCO annotations or Karpathy/BLIP JSON (default: Flickr8k)")
    p.add_argument("--image-root", help="images of --references (when captioning)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--spice-dir", help="folder with the Stanford CoreNLP 3.6.0 jars")
    p.add_argument("--clip-model", help="CLIP name or folder for CLIP-Score")
    p.add_argument("--no-bert-score", action="store_true")
    p.add_argument("--out", help="write the metrics JSON here (also printed)")
    p.add_argument("--save-results", help="write the generated captions (COCO results JSON)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sampling setting of the model's config, e.g. clamp_mask_pad=false, "
                        "sampling_noise_factor=1, refine_keep=0.3 (repeatable)")
    _add_sampling(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency / quality benchmarks (writes tables and plots)")
    p.add_argument("what", nargs="*", default=["latency"],
                   help="latency, flops, quality, lengths, ablations, curves, pareto, infill, memorise, or all (= the first four; default latency)")
    p.add_argument("--model", help="quality/lengths: LaDiC model folder (default: the shipped full-sampler model, whose "
                                   "sampler settings the quality grid varies)")
    p.add_argument("--ar-model", default="shipped",
                   help="AR baseline folder (default: the shipped baseline; 'none' skips the AR rows)")
    p.add_argument("--out-dir", default="ladic-bench",
                   help="where the tables, JSON and plots go (default ./ladic-bench; the committed tables are under "
                        "docs/bench/<name>, named explicitly in docs/BENCHMARKS.md)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per setting (median reported)")
    p.add_argument("--limit", type=int, default=None, help="quality/lengths/ablations: first N images of the split")
    p.add_argument("--device", default="cpu")
    from ladic.bench import add_bench_arguments  # stdlib-only import; no torch here

    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="local web demo on 127.0.0.1")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860, help="0 picks a free port (default 7860)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-request-seconds", type=float, default=5.0, metavar="S",
                   help="refuse a request estimated (from a timing at start-up) to take longer than S seconds on this "
                        "machine, and stop one that runs twice as long (default 5)")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "rerank", False) and args.mbr is not None and args.mbr < 2:
        print("error: --rerank chooses among candidates; give --mbr K with K >= 2", file=sys.stderr)
        return 2
    shipped = [flag for flag in ("fast", "full") if getattr(args, flag, False)]
    if shipped:
        if args.model is not None or len(shipped) > 1:
            print("error: --fast and --full each pick a shipped model; give one of --model, --fast, --full",
                  file=sys.stderr)
            return 2
        from ladic.captioner import default_model_path, full_model_path

        args.model = str(default_model_path() if shipped == ["fast"] else full_model_path())
    try:
        _check_options(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # A bad option or model folder: one line, no traceback. Checked via sys.modules so the CLI never imports
        # torch here.
        checkpoint, encoders = sys.modules.get("ladic.checkpoint"), sys.modules.get("ladic.image_encoders")
        sources = sys.modules.get("ladic.data.sources")
        if (isinstance(e, UsageError) or (checkpoint is not None and isinstance(e, checkpoint.CheckpointError))
                or (encoders is not None and isinstance(e, encoders.EncoderLoadError))
                or (sources is not None and isinstance(e, sources.DataError))):
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
