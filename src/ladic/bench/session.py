"""Models, records and captions shared by the subcommands of one ``ladic bench`` run."""

from __future__ import annotations

import argparse
from typing import Any

from ladic.bench.quality import CaptionMemo
from ladic.bench.text_stats import TrainingText, training_text


class Session:
    """Models, records and captions shared by the subcommands of one ``ladic bench`` run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.memo = CaptionMemo()
        self._models: dict[str, Any] = {}
        self._records = None
        self._train_text: TrainingText | None = None
        self._train_text_loaded = False

    def _ladic_at(self, key: str, path, option: str):
        if key not in self._models:
            from ladic.captioner import LaDiC
            from ladic.models import load_model

            m = load_model(path, device=self.args.device)
            if not isinstance(m, LaDiC):
                raise ValueError(f"{option} {path} is not a LaDiC model folder")
            self._models[key] = m
        return self._models[key]

    def ladic(self):
        """The LaDiC model of ``--model`` (default: the shipped full-sampler model)."""
        from ladic.captioner import full_model_path

        return self._ladic_at("ladic", self.args.model or full_model_path(), "--model")

    def student(self):
        """``bench pareto`` / ``infill``: the few-step student of ``--student`` (default: the shipped one)."""
        from ladic.captioner import default_model_path

        return self._ladic_at("student", self.args.student or default_model_path(), "--student")

    def teacher(self):
        """``bench pareto`` / ``infill``: the full-sampler model of ``--teacher`` (default: the shipped one)."""
        from ladic.captioner import full_model_path

        return self._ladic_at("teacher", self.args.teacher or full_model_path(), "--teacher")

    def ar_path(self) -> str | None:
        """The AR baseline folder of ``--ar-model`` ("shipped": the packaged one if present; "none": no AR rows)."""
        from ladic.baselines.ar import default_ar_model_path

        choice = self.args.ar_model
        if choice == "shipped":
            return str(default_ar_model_path()) if default_ar_model_path().is_dir() else None
        return None if choice in (None, "none") else choice

    def ar(self):
        path = self.ar_path()
        if path is None:
            return None
        if "ar" not in self._models:
            from ladic.baselines.ar import ARCaptioner
            from ladic.models import load_model

            m = load_model(path, device=self.args.device)
            if not isinstance(m, ARCaptioner):
                raise ValueError(f"--ar-model {self.args.ar_model} is not an AR baseline folder (model_type 'ar')")
            self._models["ar"] = m
        return self._models["ar"]

    def records(self):
        if self._records is None:
            from ladic.data.captions import load_flickr8k

            recs = load_flickr8k(self.args.split)
            self._records = recs[: self.args.limit] if self.args.limit else recs
        return self._records

    def train_records(self):
        """The Flickr8k train records (raises FileNotFoundError when Flickr8k is absent)."""
        from ladic.data.captions import load_flickr8k

        return load_flickr8k("train")

    def train_text(self) -> TrainingText | None:
        """Word counts and pairs of the Flickr8k train references (for OOV words % and broken pair %), loaded once;
        None when Flickr8k is absent."""
        if not self._train_text_loaded:
            from ladic.data.captions import load_flickr8k

            try:
                records = load_flickr8k("train")
            except FileNotFoundError:
                records = None
            if records is not None:
                self._train_text = training_text(c for r in records for c in r.captions)
            self._train_text_loaded = True
        return self._train_text

    def data_notes(self) -> list[str]:
        a = self.args
        n = len(self.records())
        notes = [f"Data: Flickr8k {a.split}, {'the first ' if a.limit else 'all '}{n} images, 5 references each."]
        notes.append(f"LaDiC model: {a.model or 'shipped default'}; AR model: {self.ar_path() or 'none (AR rows skipped)'}.")
        return notes
