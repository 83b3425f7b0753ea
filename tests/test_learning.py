"""A real learning test: the tiny diffuser, trained for a minute or two on procedural scenes, names colour and shape.

The tiny preset's random conv encoder learns colour fast but shape slowly, so this test uses the frozen
ImageNet EfficientNet-Lite0 (offline) with the tiny diffuser: what is tested is that LaDiC's latent
diffusion learns to name what the image shows. One caption template per scene keeps the run short.
"""

from ladic import LaDiC
from ladic.data.scenes import COLOURS, SHAPES, make_scenes
from ladic.train import TrainConfig, train


def test_tiny_model_learns_colour_and_shape(tmp_path):
    tc = TrainConfig.load(None, [
        "preset=tiny", "data=scenes", "num_scenes=800", "scene_size=64", "scene_max_objects=1", "scene_captions=1",
        "batch_size=32", "max_steps=300", "lr=0.003", "ema_decay=0.95", "save_every=1000", "eval_every=0",
        "val_images=0", "progress=false", "model.max_length=10", "model.image_encoder=efficientnet-lite0",
        f"out_dir={tmp_path}",
    ])
    model = LaDiC.from_pretrained(train(tc))
    held_out = make_scenes(40, seed=12345, size=64, max_objects=1)  # never seen in training (seed 0)
    captions = model.caption([s.image for s in held_out], seed=0, batch_size=40)
    colour = sum(s.objects[0]["colour"] in c.split() for s, c in zip(held_out, captions)) / len(held_out)
    shape = sum(s.objects[0]["shape"] in c.split() for s, c in zip(held_out, captions)) / len(held_out)
    print(f"colour acc {colour:.2f} (chance {1 / len(COLOURS):.2f}), shape acc {shape:.2f} (chance {1 / len(SHAPES):.2f})")
    print(list(zip([s.captions[0] for s in held_out[:5]], captions[:5])))
    assert colour >= 0.45, captions[:10]  # chance 1/7
    assert shape >= 0.6, captions[:10]  # chance 1/4
