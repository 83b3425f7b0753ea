"""Few-step student pieces: training timesteps where the student samples, given words through the
self-conditioning input, and a LaDiC teacher's MBR captions as distillation targets."""

import pytest
import torch

from ladic import LaDiC, preset
from ladic.config import LaDiCConfig
from ladic.diffusion import GaussianDiffusion


def test_few_step_timesteps_concentrate_where_the_student_samples():
    d = GaussianDiffusion(1000, timestep_sampling="few_step", student_steps=2, student_prob=1.0)
    t = d.sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(d.inference_timesteps(1)) | set(d.inference_timesteps(2)) == {999, 0}
    d = GaussianDiffusion(1000, timestep_sampling="few_step", student_steps=1, student_prob=0.5)
    t = d.sample_timesteps(4000, torch.Generator().manual_seed(0))
    share = (t == 999).float().mean().item()
    assert 0.45 < share < 0.55 and len(set(t.tolist())) > 500  # the rest stays uniform
    with pytest.raises(ValueError, match="timestep_sampling"):
        LaDiCConfig(timestep_sampling="student")
    with pytest.raises(ValueError, match="student"):
        LaDiCConfig(student_steps=0)
    with pytest.raises(ValueError, match="infill_self_cond_prob"):
        LaDiCConfig(infill_self_cond_prob=2.0)


def test_given_words_reach_the_first_call_through_self_conditioning(scenes, monkeypatch):
    torch.manual_seed(0)
    model = LaDiC(preset("tiny", infill_self_cond_prob=0.5)).eval()
    seen = []
    forward = model.diffuser.forward
    monkeypatch.setattr(model.diffuser, "forward", lambda x, t, sc, kv: seen.append(sc.clone()) or forward(x, t, sc, kv))
    model.infill(scenes[0].image, "a ___ circle", num_inference_steps=1, guidance_scale=0.0, back_and_refine=False)
    fixed, x0, _ = model.infill_template("a ___ circle")
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0][fixed[0]], x0[0][fixed[0]])
    assert seen[0][0][~fixed[0]].abs().sum() == 0 and x0[0][fixed[0]].abs().sum() > 0
    seen.clear()
    model.caption([scenes[0].image], num_inference_steps=1, guidance_scale=0.0, back_and_refine=False)
    assert seen[0].abs().sum() == 0  # no template: the usual all-zero first self-conditioning
    # Training: the draws carry the given-position uniforms, and the loss runs.
    draws = model.draw_training_noise(4, torch.Generator().manual_seed(0))
    assert draws["u_keep"].shape == (4, model.config.max_length) and "u_infill" in draws
    x0, ids = model.encode_captions([s.captions[0] for s in scenes[:4]])
    losses = model.training_losses(model.encode_images([s.image for s in scenes[:4]]), x0, ids, draws)
    assert torch.isfinite(losses["loss"])
    plain = LaDiC(preset("tiny"))
    assert "u_keep" not in plain.draw_training_noise(4, torch.Generator().manual_seed(0))


def test_a_ladic_teacher_with_mbr_writes_the_targets(tmp_path, scenes):
    from ladic.data.distill import teacher_captions

    torch.manual_seed(0)
    teacher = LaDiC(preset("tiny"))
    teacher.save_pretrained(tmp_path / "teacher")
    images = [s.image for s in scenes]
    ids = [f"s{i}" for i in range(len(images))]
    caps = teacher_captions(tmp_path / "teacher", ids, images, mbr_candidates=3, cache_dir=tmp_path / "cache")
    loaded = LaDiC.from_pretrained(tmp_path / "teacher")
    assert caps == loaded.caption(images, mbr_candidates=3, seed=0)
    teacher_captions(tmp_path / "teacher", ids, images, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("teacher-*.json"))) == 2  # MBR and plain: two cache entries
    cands = teacher_captions(tmp_path / "teacher", ids, images, mbr_candidates=3, cache_dir=tmp_path / "cache",
                             candidates=True)
    assert cands == loaded.generate(images, mbr_candidates=3, seed=0).candidates
    assert len(cands) == len(images) and all(len(c) == 3 and cap in c for c, cap in zip(cands, caps))
    assert len(list((tmp_path / "cache").glob("teacher-*.json"))) == 3  # the candidates are a third entry
    with pytest.raises(ValueError, match="mbr_candidates"):
        teacher_captions(tmp_path / "teacher", ids, images, candidates=True)


def test_the_target_can_be_the_draw_closest_to_the_human_references():
    from ladic.data.captions import CaptionRecord
    from ladic.data.distill import select_by_references

    refs = [["a dog runs on the grass", "a brown dog runs on grass", "a dog running on the grass"],
            ["a man rides a red bike", "a man on a bike", "a cyclist rides a red bicycle"]]
    records = [CaptionRecord(str(i), f"{i}.jpg", r, "train") for i, r in enumerate(refs)]
    candidates = [["a cat sleeps on a sofa", "a brown dog runs on the grass", "a dog runs on the"],
                  ["a man rides a red bike down the", "two women walk", "a man in a hat"]]
    picked = select_by_references(candidates, records)
    assert picked[0] == "a brown dog runs on the grass"
    # the closest draw ends on "the", so the best complete one is taken instead
    assert picked[1] == "a man in a hat"
    assert select_by_references([["x y", "a man rides a red bike down the"]], records[1:]) == ["x y"]
    with pytest.raises(ValueError, match="candidate lists"):
        select_by_references(candidates[:1], records)


def _teacher_rank(rank: int, world: int, folder: str, init: str, out: str) -> None:
    import json

    import torch.distributed as dist

    from ladic.data.scenes import make_scenes
    from ladic.data.distill import teacher_captions

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    images = [s.image for s in make_scenes(7, seed=3, size=32)]
    caps = teacher_captions(folder, [f"s{i}" for i in range(7)], images, sampler={"guidance_scale": 0.0},
                            batch_size=2, chunk_size=3, cache_dir=f"{out}-cache")  # chunks of 3, 3 and 1 photos
    with open(f"{out}.{rank}", "w") as f:
        json.dump(caps, f)
    dist.destroy_process_group()


def test_teacher_captions_sampler_overrides_and_two_ranks(tmp_path):
    """Sampler overrides reach the teacher (and its cache key); two ranks each caption every other image and
    both end with the one-process list."""
    import json

    import torch.multiprocessing as mp

    from ladic.data.distill import teacher_captions
    from ladic.data.scenes import make_scenes

    torch.manual_seed(0)
    LaDiC(preset("tiny")).save_pretrained(tmp_path / "teacher")
    images = [s.image for s in make_scenes(7, seed=3, size=32)]
    ids = [f"s{i}" for i in range(7)]
    one = teacher_captions(tmp_path / "teacher", ids, images, sampler={"guidance_scale": 0.0},
                           cache_dir=tmp_path / "cache")
    loaded = LaDiC.from_pretrained(tmp_path / "teacher")
    assert one == loaded.caption(images, guidance_scale=0.0, seed=0)
    teacher_captions(tmp_path / "teacher", ids, images, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("teacher-*.json"))) == 2  # w = 0 and the default: two entries
    from ladic.baselines.ar import ARCaptioner

    ARCaptioner(preset("tiny")).save_pretrained(tmp_path / "ar")
    with pytest.raises(ValueError, match="LaDiC teacher"):
        teacher_captions(tmp_path / "ar", ids, images, sampler={"guidance_scale": 0.0})

    mp.spawn(_teacher_rank, args=(2, str(tmp_path / "teacher"), str(tmp_path / "init"), str(tmp_path / "caps")),
             nprocs=2)
    for rank in range(2):
        assert json.loads((tmp_path / f"caps.{rank}").read_text()) == one
    cached = list((tmp_path / "caps-cache").iterdir())  # the whole list; the chunks are gone
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == one


def test_teacher_captions_resume_from_their_saved_chunks(tmp_path, monkeypatch):
    """A cached teacher run saves its captions chunk by chunk: a run stopped in its second chunk resumes from the
    first (only the missing photos are captioned), ends with the uninterrupted run's list, and leaves only the
    whole list in the cache."""
    from ladic.data.distill import teacher_captions
    from ladic.data.scenes import make_scenes

    torch.manual_seed(0)
    LaDiC(preset("tiny")).save_pretrained(tmp_path / "teacher")
    images = [s.image for s in make_scenes(10, seed=3, size=32)]
    ids = [f"s{i}" for i in range(10)]
    kw = {"sampler": {"guidance_scale": 0.0, "num_inference_steps": 3}, "chunk_size": 4, "cache_dir": tmp_path / "cache"}
    whole = teacher_captions(tmp_path / "teacher", ids, images, sampler=kw["sampler"])
    generate, calls = LaDiC.generate, []

    def stopped_in_the_second_chunk(self, part, **kwargs):
        calls.append(len(part))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(self, part, **kwargs)

    monkeypatch.setattr(LaDiC, "generate", stopped_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        teacher_captions(tmp_path / "teacher", ids, images, **kw)
    assert [p.name for p in (tmp_path / "cache").glob("teacher-*.parts/*")] == ["0000000.json"]
    assert not list((tmp_path / "cache").glob("teacher-*.json"))
    calls.clear()
    monkeypatch.setattr(LaDiC, "generate", lambda self, part, **kwargs: calls.append(len(part)) or generate(self, part, **kwargs))
    assert teacher_captions(tmp_path / "teacher", ids, images, **kw) == whole
    assert calls == [4, 2]  # photos 4-7 and 8-9; 0-3 came from the saved chunk
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".json"]


def test_dangling_teacher_captions_fall_back_to_the_consensus_reference():
    from ladic.data.captions import CaptionRecord, ends_on_function_word
    from ladic.data.distill import replace_dangling

    refs = ["a dog runs on the grass", "a dog runs on grass", "a brown dog runs on the grass", "a cat sleeps"]
    records = [CaptionRecord("a", "a.jpg", refs, "train"), CaptionRecord("b", "b.jpg", refs, "train")]
    teacher = ["a dog is running in front of a", "a dog runs on the grass"]
    assert ends_on_function_word(teacher[0]) and not ends_on_function_word(teacher[1])
    fixed = replace_dangling(teacher, records, "reference")
    assert fixed[1] == teacher[1]  # complete captions stay
    assert fixed[0] == "a dog runs on the grass"  # the reference closest (CIDEr-D) to the other three
    assert replace_dangling(teacher, records, "keep") == teacher
    with pytest.raises(ValueError, match="distill_dangling"):
        replace_dangling(teacher, records, "drop")


def test_length_conditioning_pieces(tmp_path, scenes, monkeypatch):
    """The length embedding starts at zero (a model initialised from one without it denoises identically), the
    template takes one length per row, MBR candidates get the k most likely lengths (or all the most likely one),
    and training adds the length loss."""
    torch.manual_seed(0)
    plain = LaDiC(preset("tiny"))
    plain.save_pretrained(tmp_path / "plain")
    model = LaDiC(preset("tiny", length_conditioning=True)).eval()
    fresh = model.load_folder_weights(tmp_path / "plain", missing_ok=True)
    assert sorted(fresh) == ["diffuser.length_emb.weight", "diffuser.length_head.bias", "diffuser.length_head.weight"]
    with pytest.raises(Exception, match="missing"):
        LaDiC(preset("tiny", length_conditioning=True)).load_folder_weights(tmp_path / "plain")
    images = [s.image for s in scenes[:3]]
    ctx = model.diffuser.image_context(model.encode_images(images))
    assert torch.equal(model.diffuser.add_length(ctx, torch.tensor([0, 3, 5])), ctx)

    fixed, _, given = model.length_template(3, torch.tensor([1, 2, 4]))
    assert model.caption_lengths(given).tolist() == [1, 2, 4]
    assert (given == -1).sum(1).tolist() == [1, 2, 4] and fixed.sum(1).tolist() == [model.config.max_length - n for n in (1, 2, 4)]
    logits = model.diffuser.predict_length(ctx)
    assert logits.shape == (3, model.config.max_length + 1) and torch.isinf(logits[:, 0]).all()
    lengths = model.predicted_lengths(ctx.repeat_interleave(2, dim=0), 2)
    top2 = logits.topk(2, dim=-1).indices
    assert lengths.tolist() == top2.reshape(-1).tolist()
    assert model.predicted_lengths(ctx.repeat_interleave(2, dim=0), 2, "predicted").tolist() == \
        top2[:, 0].repeat_interleave(2).tolist()
    with pytest.raises(ValueError, match="mbr_lengths"):
        model.predicted_lengths(ctx, 1, "best")

    sampling = dict(num_inference_steps=1, guidance_scale=0.0, back_and_refine=False, seed=0)
    # (captions at a predicted length collapse adjacent repeats, which an untrained model makes: counted uncollapsed)
    to_text = model.text.ids_to_text
    monkeypatch.setattr(model.text, "ids_to_text", lambda ids, collapse_repeats=True: to_text(ids, collapse_repeats=False))
    caps = model.generate(images, **sampling).captions
    n_words = [len(model.text.tokenizer.encode(c, add_special_tokens=False)) for c in caps]
    assert n_words == top2[:, 0].tolist()  # exactly the predicted number of word pieces
    out = model.generate(images, mbr_candidates=2, **sampling)
    assert [[len(model.text.tokenizer.encode(c, add_special_tokens=False)) for c in group]
            for group in out.candidates] == top2.tolist()
    out = model.generate(images, mbr_candidates=2, mbr_lengths="predicted", **sampling)
    assert [[len(model.text.tokenizer.encode(c, add_special_tokens=False)) for c in group]
            for group in out.candidates] == top2[:, :1].repeat(1, 2).tolist()
    assert all(len(model.text.tokenizer.encode(c, add_special_tokens=False)) == 3
               for c in model.caption(images, length=3, **sampling))

    model.train()
    x0, ids = model.encode_captions([s.captions[0] for s in scenes[:3]])
    losses = model.training_losses(model.encode_images(images), x0, ids,
                                   model.draw_training_noise(3, torch.Generator().manual_seed(0)))
    assert torch.isfinite(losses["length"]) and losses["length"] > 0
    losses["loss"].backward()
    assert model.diffuser.length_head.weight.grad.abs().sum() > 0
