"""Caption cleaning and loaders for Karpathy / BLIP caption files and Stanford paragraphs."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KARPATHY_SPLITS = ("train", "val", "test")
DATA_ENV = "LADIC_DATA"
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")
_SENTENCE_END = re.compile(r"[.!?]+")
_COCO_NAME = re.compile(r"COCO_[A-Za-z]+\d*_0*(\d+)$")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Clean a caption exactly like BLIP's `pre_caption` (lowercase, drop punctuation, truncate)."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_paragraph(paragraph: str, max_words: int = 200) -> str:
    """Clean a multi-sentence paragraph, keeping sentence boundaries.

    The text is split on runs of `.`, `!` and `?`; each sentence is cleaned with
    `pre_caption` and empty ones are dropped. Sentences are re-joined as
    "first sentence. second sentence." (a period glued to the last word, one space
    between sentences), which BERT's tokenizer splits exactly like " . ".
    At most `max_words` words are kept (periods do not count); a cut sentence still ends
    with a period. Decimal numbers such as "2.5" are split like sentence ends.
    """
    sentences: list[str] = []
    budget = max_words
    for piece in _SENTENCE_END.split(paragraph):
        words = pre_caption(piece, max_words=max_words).split()
        if not words or budget <= 0:
            continue
        words = words[:budget]
        budget -= len(words)
        sentences.append(" ".join(words) + ".")
    return " ".join(sentences)


FUNCTION_WORDS = frozenset({
    "a", "an", "the",  # articles
    "of", "in", "on", "at", "to", "with", "for", "from", "by", "into", "onto", "near", "under", "over",
    "through", "across", "between", "beside", "toward", "towards", "against", "along",  # prepositions
    "and", "or", "but", "nor", "while", "as", "than", "because",  # conjunctions
    "his", "her", "its", "their", "my", "your", "our", "whose",  # possessives
})  # a caption ending on one of these ("a dog runs on the") is cut off mid-phrase
_WORD = re.compile(r"[a-z0-9]+")


def caption_words(caption: str) -> list[str]:
    """The words of a caption: lowercase letter/digit runs ("A dog's ball." -> a, dog, s, ball)."""
    return _WORD.findall(caption.lower())


def ends_on_function_word(caption: str) -> bool:
    """True when the caption's last word is in ``FUNCTION_WORDS`` ("a dog runs on the")."""
    words = caption_words(caption)
    return bool(words) and words[-1] in FUNCTION_WORDS


def cider_table(
    candidates: Sequence[Sequence[str]], references: Callable[[int, int], list[str]]
) -> list[list[float]]:
    """``scores[i][j]``: CIDEr-D (pycocoevalcap's ``Cider``) of ``candidates[i][j]`` against ``references(i, j)``,
    document frequencies over all images scored in column ``j``. Captions must already be cleaned (``pre_caption``):
    no tokenizer runs. ``candidates`` (N, k_i): images may have different numbers of candidates (0 included)."""
    from pycocoevalcap.cider.cider import Cider

    scores: list[list[float]] = [[] for _ in candidates]
    for j in range(max((len(c) for c in candidates), default=0)):
        ids = [i for i, c in enumerate(candidates) if len(c) > j]
        _, column = Cider().compute_score({i: references(i, j) for i in ids}, {i: [candidates[i][j]] for i in ids})
        for i, score in zip(ids, column):
            scores[i].append(float(score))
    return scores


def consensus_index(references: list[list[str]]) -> list[int]:
    """For each image's references, the index of the consensus reference: the one with the highest CIDEr-D
    (``cider_table``) against the image's other references, document frequencies over all images.
    Images with a single reference get 0. Captions must already be cleaned (``pre_caption``): no tokenizer runs.
    """
    scored = [r if len(r) > 1 else [] for r in references]
    table = cider_table(scored, lambda i, k: references[i][:k] + references[i][k + 1 :])
    return [max(range(len(s)), key=s.__getitem__) if s else 0 for s in table]


@dataclass
class CaptionRecord:
    """One image with all of its reference captions."""

    image_id: str
    image_path: str
    captions: list[str]
    split: str


def _read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _image_id_from_name(name: str) -> str:
    """COCO file names give their numeric cocoid; anything else gives the file stem."""
    stem = Path(name).stem
    match = _COCO_NAME.match(stem)
    return str(int(match.group(1))) if match else stem


def _clean_all(raw: list[str], max_words: int) -> list[str]:
    cleaned = (pre_caption(c, max_words) for c in raw)
    return [c for c in cleaned if c]


def _select(records: list[CaptionRecord], split: str | None, path: Path) -> list[CaptionRecord]:
    if split is None:
        return records
    available = sorted({r.split for r in records})
    if split not in available:
        hint = " ('restval' is merged into 'train')" if split == "restval" else ""
        raise ValueError(f"split {split!r} not in {path}; available: {available}{hint}")
    return [r for r in records if r.split == split]


def _from_karpathy(data: dict, image_root: Path, max_words: int) -> list[CaptionRecord]:
    records = []
    for img in data["images"]:
        folder = image_root / img["filepath"] if "filepath" in img else image_root
        image_id = str(img["cocoid"]) if "cocoid" in img else Path(img["filename"]).stem
        split = "train" if img["split"] == "restval" else img["split"]
        captions = _clean_all([s["raw"] for s in img["sentences"]], max_words)
        if captions:
            records.append(CaptionRecord(image_id, str(folder / img["filename"]), captions, split))
    return records


def _from_coco(data: dict, image_root: Path, split: str, max_words: int) -> list[CaptionRecord]:
    """The official COCO captions file (``captions_train2017.json``): ``images`` [{id, file_name}] and
    ``annotations`` [{image_id, caption}]; image_id is the COCO id, the path ``image_root/file_name``."""
    by_image: dict[Any, list[str]] = defaultdict(list)
    for a in data["annotations"]:
        if isinstance(a.get("caption"), str):
            by_image[a.get("image_id")].append(a["caption"])
    records = []
    for img in data["images"]:
        captions = _clean_all(by_image.get(img.get("id"), []), max_words)
        if captions and "file_name" in img:
            records.append(CaptionRecord(str(img["id"]), str(image_root / img["file_name"]), captions, split))
    return records


def _split_from_name(path: Path) -> str | None:
    words = set(re.split(r"[^a-z]+", path.stem.lower()))
    found = [s for s in KARPATHY_SPLITS if s in words]
    return found[0] if len(found) == 1 else None


def _from_blip(data: list[dict], image_root: Path, split: str, max_words: int) -> list[CaptionRecord]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for entry in data:
        caps = entry["caption"]
        grouped[entry["image"]].extend([caps] if isinstance(caps, str) else caps)
    records = []
    for image, raw in grouped.items():
        captions = _clean_all(raw, max_words)
        if captions:
            records.append(CaptionRecord(_image_id_from_name(image), str(image_root / image), captions, split))
    return records


def _is_blip(data: Any) -> bool:
    return (
        isinstance(data, list)
        and len(data) > 0
        and all(isinstance(e, dict) and "image" in e and "caption" in e for e in data)
        and all(isinstance(e["caption"], (str, list)) for e in data)
    )


def load_karpathy(
    json_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    split: str | None = None,
    max_words: int = 50,
) -> list[CaptionRecord]:
    """Load a caption file, autodetecting its format; `split=None` keeps every split.

    Karpathy files (`dataset_{coco,flickr8k,flickr30k}.json`): image path is
    `image_root/[filepath/]filename`, image_id is the cocoid for COCO and the file stem
    otherwise, and "restval" counts as "train".
    BLIP files (`coco_karpathy_{train,val,test}.json`, one entry per caption or per image):
    entries are grouped by image; image_id is the cocoid for COCO file names, else the file
    stem; the split comes from the file name, else from `split`, else "train" for one
    caption per entry and "val" for caption lists.
    The official COCO captions files (`captions_{train,val}2017.json`: `images` + `annotations`): image_id is
    the COCO id, the image path `image_root/file_name`, the split from the file name, else `split`, else "train".

    Captions are cleaned with `pre_caption`; captions empty after cleaning are dropped.
    """
    path = Path(json_path)
    data = _read_json(path)
    root = Path(image_root)
    if isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        records = _from_coco(data, root, _split_from_name(path) or split or "train", max_words)
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        records = _from_karpathy(data, root, max_words)
    elif _is_blip(data):
        per_caption = isinstance(data[0]["caption"], str)
        file_split = _split_from_name(path) or split or ("train" if per_caption else "val")
        records = _from_blip(data, root, file_split, max_words)
    else:
        raise ValueError(
            f"unrecognised caption file format in {path}: expected a Karpathy "
            '{"images": [...]} object or a BLIP list of {"image", "caption"} entries'
        )
    return _select(records, split, path)


IMAGE_COLUMNS = ("image", "file_name", "filepath", "path", "key")
"""Column names read as the image of a pairs file, first present wins; "key" (img2dataset) means ``<key>.jpg``."""
CAPTION_COLUMNS = ("caption", "text")


def load_pairs(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    split: str = "train",
    image_column: str | None = None,
    caption_column: str | None = None,
    max_words: int = 50,
) -> list[CaptionRecord]:
    """Image-caption pairs, one per line of a JSONL file or per row of a CSV file with a header row; rows of the
    same image are grouped. Columns: ``image_column`` / ``caption_column``, else the first of ``IMAGE_COLUMNS`` /
    ``CAPTION_COLUMNS`` present (img2dataset's ``key`` means the image ``image_root/<key>.jpg``). Rows without a
    text caption are skipped and counted in a warning that names the first few. Every record gets ``split``."""
    import csv
    import warnings

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(f))
        else:
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {n} is not JSON ({e})") from None
    if not rows:
        return []
    columns = set(rows[0])
    image_col = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    caption_col = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    if image_col not in columns or caption_col not in columns:
        raise ValueError(f"{path}: no image column ({image_column or ', '.join(IMAGE_COLUMNS)}) or caption column "
                         f"({caption_column or ', '.join(CAPTION_COLUMNS)}); its columns: {', '.join(sorted(columns))}")
    grouped: dict[str, list[str]] = defaultdict(list)  # image -> cleaned captions
    skipped: list[int] = []
    for n, row in enumerate(rows, 1):
        image, caption = row.get(image_col), row.get(caption_col)
        cleaned = pre_caption(caption, max_words) if isinstance(caption, str) else ""
        if not isinstance(image, str) or not image or not cleaned:
            skipped.append(n)
            continue
        grouped[f"{image}.jpg" if image_col == "key" else image].append(cleaned)
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} of {len(rows)} rows without an image or a text caption "
                      f"(rows {', '.join(map(str, skipped[:5]))}{' ...' if len(skipped) > 5 else ''})", stacklevel=2)
    root = Path(image_root)
    return [CaptionRecord(_image_id_from_name(image), str(root / image), captions, split)
            for image, captions in grouped.items()]


def load_captions(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str], split: str | None = None, max_words: int = 50
) -> list[CaptionRecord]:
    """Any caption source by its file: ``.jsonl`` / ``.csv`` pairs (``load_pairs``, the whole file is ``split``),
    else a JSON caption file (Karpathy, BLIP or official COCO; ``load_karpathy``)."""
    if Path(path).suffix.lower() in (".jsonl", ".csv"):
        return load_pairs(path, image_root, split or "train", max_words=max_words)
    return load_karpathy(path, image_root, split, max_words)


def load_paragraphs(
    paragraphs_json: str | os.PathLike[str],
    split_ids_json: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    split: str,
    max_words: int = 200,
) -> list[CaptionRecord]:
    """Load Stanford image-paragraph records for the image ids listed in `split_ids_json`.

    `paragraphs_json` is `paragraphs_v1.json` (a list of {"image_id", "url", "paragraph"});
    the split file is a JSON list of ints. Records follow the split file's order; the image
    path is `image_root/<image_id>.jpg`; captions hold the paragraph(s) cleaned by
    `pre_paragraph` ("sentence one. sentence two.").
    """
    paragraphs = _read_json(paragraphs_json)
    ids = _read_json(split_ids_json)
    if not isinstance(paragraphs, list) or not all(
        isinstance(p, dict) and "image_id" in p and "paragraph" in p for p in paragraphs
    ):
        raise ValueError(f"{paragraphs_json}: expected a list of {{'image_id', 'paragraph'}} entries")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{split_ids_json}: expected a JSON list of integer image ids")
    by_id: dict[int, list[str]] = defaultdict(list)
    for p in paragraphs:
        by_id[int(p["image_id"])].append(p["paragraph"])
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(
            f"{len(missing)} image ids of {split_ids_json} have no paragraph in {paragraphs_json} "
            f"(first: {missing[:5]})"
        )
    root = Path(image_root)
    records = []
    for i in ids:
        captions = [c for c in (pre_paragraph(p, max_words) for p in by_id[i]) if c]
        if captions:
            records.append(CaptionRecord(str(i), str(root / f"{i}.jpg"), captions, split))
    return records


def _find_project_root() -> Path:
    """The nearest directory holding pyproject.toml above this file, else above the cwd."""
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for folder in (start, *start.parents):
            if (folder / "pyproject.toml").is_file():
                return folder
    return Path.cwd().resolve()


def flickr8k_root(project_root: Path | None = None) -> Path:
    """Where Flickr8k lives: `<project_root>/../shared/data/flickr8k`, or `$LADIC_DATA/flickr8k`.

    An explicit `project_root` wins over `LADIC_DATA` (which names the `data` directory).
    The path is returned whether or not it exists; see `require_flickr8k`.
    """
    if project_root is None and os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser() / "flickr8k"
    root = Path(project_root) if project_root is not None else _find_project_root()
    return (root / ".." / "shared" / "data" / "flickr8k").resolve()


def require_flickr8k(project_root: Path | None = None) -> Path:
    """`flickr8k_root()`, raising FileNotFoundError if its captions.json or images/ is missing."""
    root = flickr8k_root(project_root)
    for need in (root / "captions.json", root / "images"):
        if not need.exists():
            raise FileNotFoundError(
                f"Flickr8k not found: {need} is missing. Put the data set at "
                f"../shared/data/flickr8k next to the repository, or set {DATA_ENV} to the "
                "directory that holds flickr8k/."
            )
    return root


def load_flickr8k(split: str | None = None, project_root: Path | None = None) -> list[CaptionRecord]:
    """Flickr8k records (train 6000 / val 1000 images, 5 captions each) from `require_flickr8k()`."""
    root = require_flickr8k(project_root)
    return load_karpathy(root / "captions.json", root / "images", split)
