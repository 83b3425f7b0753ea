"""``ladic bench``: latency, FLOP/s, quality, quality-by-length and ablation tables (markdown + JSON) and plots (PNG).

Subcommands (``ladic bench WHAT ...``; ``all`` = latency flops quality lengths):

- ``latency``: seconds per ``generate`` call vs caption length (paper Fig. 2a) for LaDiC at several step counts
  and the AR baseline (greedy and beam), per batch size, decoder-only (from precomputed image tokens) and
  end-to-end (image encoder included, photos from ``skimage.data``). Models are randomly initialised
  (``--preset``, default ``small``): timing does not depend on the weights once the AR baseline is kept from
  stopping early, which is done by banning [SEP] (``banned`` buffer) so that it runs exactly N decode steps.
- ``flops``: achieved GFLOP/s (FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``) of the diffuser
  forward, the text decoder + LM head and the image encoder at one batch size, against a plain fp32 matmul
  timed in the same run.
- ``quality``: BLEU-4 / METEOR / ROUGE-L / CIDEr and decode seconds on Flickr8k val for LaDiC sampling settings
  (steps, Back&Refine, MBR, guidance) and the AR baseline (greedy, beam). Image features come from the
  feature cache (``ladic.evaluate.caption_split``), so a row costs only its decoding.
- ``lengths``: corpus BLEU-4 per bucket of mean reference length (words) for LaDiC and AR (paper Fig. 2b).
- ``ablations``: Table-5 style ablations, each trained with the same short budget via ``ladic.train.train``
  (resumable, skipped when ``<work-dir>/<variant>/final`` exists), then scored like ``quality``.
- ``curves``: the validation curves of ``ladic train`` runs (``--runs``) side by side, from their ``log.jsonl``.
- ``pareto``: CIDEr against decoding ms/image for the few-step student (1/2 steps +/- MBR), the full-sampler
  teacher (5/30 steps x Back&Refine x clamping) and the AR baseline (greedy, beam) in one table and plot;
  ``--systems`` measures some of them now and keeps the other rows already in ``--out-dir``.
- ``infill``: share of blanked subject nouns / main verbs of val references that the student (per step count)
  and the full-sampler teacher fill back exactly.

Every file written starts with the command line, the date (UTC) and the machine (CPU model, cores, torch
version and threads).

Modules: ``report`` (run description, markdown/JSON/PNG helpers), ``timing``, ``latency``, ``flops``,
``quality``, ``lengths``, ``curves``, ``pareto``, ``text_stats`` (dangling % and OOV words %), ``ablations``, ``session`` (models and
captions shared by one run) and ``cli`` (options, runners, ``bench_cli``). Nothing here imports torch at
import time.
"""

from ladic.bench.ablations import (
    ABLATIONS, RESTORE_TIMESTEPS, Ablation, ablation_train_config, ablations_markdown, run_ablations,
)
from ladic.bench.cli import ALL, RUNNERS, SUBCOMMANDS, add_bench_arguments, bench_cli
from ladic.bench.flops import flops_markdown, flops_plot, run_flops
from ladic.bench.latency import (
    DEFAULT_LENGTHS, LatencySystem, build_timing_models, latency_markdown, latency_plot, latency_systems, run_latency,
)
from ladic.bench.lengths import (
    DEFAULT_BUCKET_EDGES, bucket_labels, bucket_of, lengths_markdown, lengths_plot, lengths_table,
)
from ladic.bench.quality import (
    QUALITY_METRICS, CaptionMemo, QualityRow, ladic_sampling, quality_markdown, quality_plot, quality_rows,
    quality_table, require_java, write_quality,
)
from ladic.bench.report import (
    command_line, cpu_model, fmt_score, fmt_seconds, machine_line, markdown_header, md_table, run_meta, save_figure,
    write_json,
)
from ladic.bench.session import Session
from ladic.bench.session import Session as _Session  # the name tests/test_shipped_models.py imports
from ladic.bench.text_stats import (
    FUNCTION_WORDS, TrainingText, broken_pair_share, broken_pairs, caption_stats, caption_words, dangling_share,
    oov_share, training_text,
)
from ladic.bench.timing import PHOTOS, example_photos, time_call

__all__ = [
    "SUBCOMMANDS", "ALL", "ABLATIONS", "Ablation", "LatencySystem", "QualityRow", "CaptionMemo", "bench_cli",
    "add_bench_arguments", "run_latency", "run_flops", "quality_rows", "quality_table", "lengths_table",
    "run_ablations", "run_meta", "bucket_of", "bucket_labels", "build_timing_models",
    "FUNCTION_WORDS", "dangling_share", "oov_share", "caption_stats", "caption_words", "TrainingText",
    "training_text", "broken_pairs", "broken_pair_share",
]
