"""uint8 images from the loader, normalised by the trainer a batch at a time: bit for bit what
the per-image transform gives."""
import numpy as np
import pytest
import torch
from toydata import square_image, write_toy_shards
from torchvision import transforms as T

from clipalign.data import train_pipeline
from clipalign.factory import create_model_and_transforms
from clipalign.image_ssl import simclr_view_transform
from clipalign.pixels import BatchNormalize, loader_transforms, normalize_batch, uint8_transform
from clipalign.train import Trainer
from clipalign.train_config import TrainConfig


def _images(n=6):
    rng = np.random.default_rng(0)
    return [square_image(c, rng, size=40) for c in ["red", "green", "blue"] * (n // 3)]


def _seeded(transform, image, seed):
    torch.manual_seed(seed)
    return transform(image)


@pytest.mark.parametrize("which", ["open_clip train", "open_clip eval", "simclr view"])
def test_split_transform_then_batch_normalise_is_bit_identical_to_the_transform(which):
    _, train, evaluate = create_model_and_transforms("ca-nano")
    transform = {"open_clip train": train, "open_clip eval": evaluate,
                 "simclr view": simclr_view_transform(32, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25))}[which]
    to_uint8, normalize = uint8_transform(transform)
    assert normalize is not None
    images = _images()
    reference = torch.stack([_seeded(transform, im, seed) for seed, im in enumerate(images)])
    raw = torch.stack([_seeded(to_uint8, im, seed) for seed, im in enumerate(images)])
    assert raw.dtype == torch.uint8 and raw.shape == reference.shape
    assert torch.equal(normalize(raw), reference)
    # (B, 2, 3, H, W) views normalise the same way
    assert torch.equal(normalize(torch.stack([raw, raw], 1)), torch.stack([reference, reference], 1))


def test_a_transform_that_does_not_end_in_to_tensor_and_normalize_is_kept_whole():
    no_normalize = T.Compose([T.Resize(32), T.ToTensor()])
    assert uint8_transform(no_normalize) == (no_normalize, None)
    plain = lambda image: torch.zeros(3, 4, 4)  # noqa: E731
    assert uint8_transform(plain) == (plain, None)
    image, views, normalizers = loader_transforms(no_normalize, None)
    assert image is no_normalize and views is None and normalizers == {}


def test_normalize_batch_leaves_float_entries_and_other_keys_alone():
    norm = BatchNormalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    floats = torch.randn(2, 3, 4, 4)
    batch = {"image": floats, "views": torch.full((2, 2, 3, 4, 4), 255, dtype=torch.uint8),
             "text": torch.ones(2, 5, dtype=torch.long)}
    out = normalize_batch(batch, {"image": norm, "views": norm})
    assert out["image"] is floats and out["text"] is batch["text"]
    assert torch.equal(out["views"], torch.full((2, 2, 3, 4, 4), 2.0))  # (1 - 0.5) / 0.25


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("shards"), n=32, per_shard=32)


def test_the_trainer_loads_uint8_and_trains_on_what_the_float_pipeline_gives(shards, tmp_path):
    cfg = TrainConfig(data=shards[0].rsplit("/", 1)[0], out=str(tmp_path), model="ca-nano", batch_size=8,
                      workers=0, shuffle_buffer=16, precision="fp32", tensorboard=False, image_ssl="simclr")
    trainer = Trainer(cfg)
    batch, _ = next(iter(trainer._pipeline(shards)))
    assert batch["image"].dtype == torch.uint8 and batch["views"].dtype == torch.uint8
    reference, _ = next(iter(train_pipeline(shards, transform=trainer.train_transform, tokenizer=trainer.tokenizer,
                                            batch_size=8, seed=trainer.stream_seed, shuffle_buffer=16,
                                            view_transform=trainer.objectives.view_transform)))
    assert all(torch.equal(v, reference[k]) for k, v in normalize_batch(batch, trainer.normalizers).items())
    # a step on the uint8 batch is the step on the normalised one
    logs = trainer.train_step(batch)
    again = Trainer(cfg).train_step(reference)
    assert logs == again
