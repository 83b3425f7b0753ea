"""Issue 29's scale benchmarks on this CPU: a synthetic set of 20,000 and 200,000 pairs (32 px procedural scenes,
JSONL + image files and webdataset shards; generated here, never committed), the tiny frozen encoder, MiniLM.

    python docs/bench/scale/scale_bench.py WORK_DIR [--sizes 20000 200000] [--steps 60]

Measures, for each size: `ladic features` as 2 torchrun processes (peak RSS per process, wall time), a kill -9 at
half way and the rerun (shards written / already there, identical to an uninterrupted run), training from the
shards (cached) and online from the webdataset shards (1 process: peak RSS, seconds per step after the first 10),
and 2 processes against 1 on the shards (the same losses). Writes WORK_DIR/scale.json; the table is in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def ladic(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "ladic.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "ladic.cli", *args]


def run(cmd: list[str]) -> tuple[str, float]:
    t = time.time()
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return r.stdout, time.time() - t


def same_shard(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def peaks(stdout: str) -> list[float]:
    return [float(m) for m in re.findall(r"peak memory (\d+) MB", stdout)]


def train_stats(out: Path, skip: int = 10) -> dict:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    late = [r for r in recs if r["step"] > skip]
    span = late[-1]["elapsed_s"] - recs[[r["step"] for r in recs].index(skip)]["elapsed_s"]
    return {"s_per_step": round(span / (late[-1]["step"] - skip), 4), "peak_rss_mb": recs[-1]["peak_rss_mb"],
            "data_wait": late[-1]["data_wait"], "losses": [r["loss"] for r in recs]}


def extraction(root: Path, feats: Path, killed: Path) -> dict:
    """`ladic features` as 2 processes; then a run killed with -9 at half way and rerun."""
    res: dict = {}
    for folder in (feats, killed):
        subprocess.run(["rm", "-rf", str(folder)])
    out, wall = run(ladic(["features", str(feats), "--config", str(root / "config.json")], nproc=2))
    res["features_2proc"] = {"wall_s": round(wall, 1), "peak_rss_mb": peaks(out)}
    shards = len(list(feats.glob("shard-*.safetensors")))
    proc = subprocess.Popen(ladic(["features", str(killed), "--config", str(root / "config.json")], nproc=2),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while len(list(killed.glob("shard-*.safetensors"))) < shards // 2 and proc.poll() is None:
        time.sleep(0.2)
    # torchrun starts its workers in sessions of their own: kill -9 every process of the run, workers included
    subprocess.run(["pkill", "-9", "-f", f"ladic.cli features {killed} "])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    done = len(list(killed.glob("shard-*.safetensors")))
    out, wall = run(ladic(["features", str(killed), "--config", str(root / "config.json")], nproc=2))
    already = sum(int(m) for m in re.findall(r"(\d+) already", out))
    same = all(same_shard(feats / p.name, p) for p in killed.glob("shard-*.safetensors"))
    res["kill9_resume"] = {"shards": shards, "done_at_kill": done, "already_on_rerun": already,
                           "rerun_wall_s": round(wall, 1), "identical_to_uninterrupted": same}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--shard-size", type=int, default=2000)
    ap.add_argument("--train-only", action="store_true", help="only the training rows (the features folders exist)")
    ap.add_argument("--paper", action="store_true", help="only the paper preset with BLIP-shaped random encoders: "
                                                           "20 steps online and from cached shards")
    args = ap.parse_args()
    from ladic.bench.synthetic import write_synthetic_pairs

    if args.paper:
        paper(args.work)
        return
    results = {}
    for n in args.sizes:
        root = args.work / f"syn-{n}"
        specs_path = root / "specs.json"
        if not specs_path.is_file():
            specs = write_synthetic_pairs(root, n, size=32, per_shard=args.shard_size, progress=True)
            specs_path.write_text(json.dumps(specs))
        specs = json.loads(specs_path.read_text())
        cfg = {"preset": "tiny", "model": {"image_encoder": "tiny-frozen"}, "data": specs["webdataset"],
               "batch_size": 64, "max_steps": args.steps, "lr": 0.002, "save_every": 10_000, "eval_every": 0,
               "val_images": 0, "log_every": 1, "progress": False, "num_workers": 1}
        (root / "config.json").write_text(json.dumps(cfg))
        res: dict = {"pairs": n}
        feats, killed = root / "features", root / "features-killed"
        if not args.train_only:
            res.update(extraction(root, feats, killed))
        for mode, sets in {"cached": [f"features_dir={feats}"], "online": ["image_features=online"]}.items():
            out_dir = root / f"train-{mode}"
            subprocess.run(["rm", "-rf", str(out_dir)])
            run(ladic(["train", "--config", str(root / "config.json"), *[a for s in sets for a in ("--set", s)],
                       "--out-dir", str(out_dir)]))
            res[f"train_{mode}"] = train_stats(out_dir)
        for nproc in (1, 2):
            out_dir = root / f"train-sgd-{nproc}"
            subprocess.run(["rm", "-rf", str(out_dir)])
            run(ladic(["train", "--config", str(root / "config.json"), "--set", f"features_dir={feats}", "--set",
                       "optimizer=sgd", "--set", "lr=0.5", "--set", "max_steps=20", "--set", "num_workers=0",
                       "--out-dir", str(out_dir)], nproc=nproc))
        one, two = (train_stats(root / f"train-sgd-{k}", skip=5)["losses"] for k in (1, 2))
        res["losses_2proc_vs_1proc_max_abs_diff"] = max(abs(a - b) for a, b in zip(one, two))
        results[n] = res
        print(json.dumps(res, indent=1), flush=True)
    (args.work / ("scale-train.json" if args.train_only else "scale.json")).write_text(json.dumps(results, indent=1))


def paper(work: Path, pairs: int = 48, steps: int = 20) -> None:
    """The paper preset (bert-base 6 + 6, BLIP ViT-B/16 at 384 px, diffuser 12 x 768) with random weights of those
    shapes, batch 8, 20 steps online and 20 from cached shards; writes WORK/paper.json."""
    from ladic.bench.synthetic import write_random_paper_backbones, write_synthetic_pairs

    backbones = write_random_paper_backbones(work / "paper-backbones")
    specs = write_synthetic_pairs(work / "paper-pairs", pairs, size=64, per_shard=16, formats=("jsonl",))
    cfg = {"preset": "paper", "model": backbones, "data": specs["jsonl"], "image_root": specs["image_root"],
           "batch_size": 8, "max_steps": steps, "lr": 5e-5, "save_every": 10_000, "eval_every": 0, "val_images": 0,
           "log_every": 1, "progress": False}
    (work / "paper.json").write_text(json.dumps(cfg))
    res: dict = {}
    feats = work / "paper-features"
    subprocess.run(["rm", "-rf", str(feats)])
    out, wall = run(ladic(["features", str(feats), "--config", str(work / "paper.json"), "--shard-size", "16"]))
    res["features"] = {"wall_s": round(wall, 1), "peak_rss_mb": peaks(out), "pairs": pairs}
    for mode, sets in {"cached": [f"features_dir={feats}"], "online": ["image_features=online"]}.items():
        out_dir = work / f"paper-train-{mode}"
        subprocess.run(["rm", "-rf", str(out_dir)])
        _, wall = run(ladic(["train", "--config", str(work / "paper.json"), *[a for s in sets for a in ("--set", s)],
                             "--out-dir", str(out_dir)]))
        stats = train_stats(out_dir, skip=5)
        res[f"train_{mode}"] = {**stats, "wall_s": round(wall, 1), "exported": (out_dir / "final" / "config.json").is_file()}
        print(mode, json.dumps(res[f"train_{mode}"]), flush=True)
    (work / "paper-result.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
