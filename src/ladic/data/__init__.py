"""Caption data: real caption files (Karpathy, BLIP, Stanford paragraphs) and procedural scenes."""

from ladic.data.captions import (
    CaptionRecord,
    flickr8k_root,
    load_flickr8k,
    load_captions,
    load_karpathy,
    load_pairs,
    load_paragraphs,
    pre_caption,
    pre_paragraph,
    require_flickr8k,
)
from ladic.data.scenes import COLOURS, SHAPES, Scene, make_scene, make_scenes, scene_records

__all__ = [
    "COLOURS",
    "SHAPES",
    "CaptionRecord",
    "Scene",
    "flickr8k_root",
    "load_flickr8k",
    "load_captions",
    "load_karpathy",
    "load_pairs",
    "load_paragraphs",
    "make_scene",
    "make_scenes",
    "pre_caption",
    "pre_paragraph",
    "require_flickr8k",
    "scene_records",
]
