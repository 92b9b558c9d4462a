"""SundaePipeline's sampling API: batches of images and masks, per-image seeds, options as an object
or as keywords, the step callback (copies, clean stop), trajectories, the progress bar, and ``to``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sundae.config import INPAINT_DEFAULTS, HourglassConfig, VQGANConfig
from sundae.denoiser import Hourglass
from sundae.errors import InputError
from sundae.pipeline import SundaePipeline, box_mask, token_mask_from_pixels
from sundae.tokenizer import VQGAN


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu")


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(2)
    return [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]


def assert_same(batch, singles) -> None:
    """``batch`` holds the results of ``singles`` one after the other: the same tokens, and the same images
    but for the rounding of the decoder's convolutions, which depends on the batch size."""
    assert torch.equal(batch.tokens, torch.cat([single.tokens for single in singles]))
    assert torch.equal(batch.steps_taken, torch.cat([single.steps_taken for single in singles]))
    assert torch.allclose(batch.images, torch.cat([single.images for single in singles]), rtol=0, atol=1e-5)


def test_batch_inpaint_equals_inpainting_each_image_alone(pipe, pictures):
    masks = [box_mask((16, 16), (2, 2, 10, 9)), box_mask((16, 16), (6, 0, 16, 12))]
    batch = pipe.inpaint(pictures, masks, num_images=2, seeds=[3, 4, 5, 6], steps=4, output_type="pt")
    singles = [pipe.inpaint(pictures[0], masks[0], seeds=[3, 4], steps=4, output_type="pt"),
               pipe.inpaint(pictures[1], masks[1], seeds=[5, 6], steps=4, output_type="pt")]
    assert batch.tokens.shape == (4, 8, 8)
    assert_same(batch, singles)
    _, known = pipe.encode(pictures[1])
    keep = ~token_mask_from_pixels(masks[1], pipe.factor)
    assert all(torch.equal(tokens[keep], known[0][keep]) for tokens in batch.tokens[2:])
    one_mask = pipe.inpaint(pictures, masks[0], seed=3, steps=4, output_type="pt")  # one mask for every image
    assert_same(one_mask, [pipe.inpaint(pictures[0], masks[0], seed=3, steps=4, output_type="pt"),
                           pipe.inpaint(pictures[1], masks[0], seed=4, steps=4, output_type="pt")])


def test_batch_refine_and_outpaint_equal_each_image_alone(pipe, pictures):
    mask = box_mask((16, 16), (0, 0, 8, 8))
    refined = pipe.refine(pictures, [mask, mask], strength=0.6, num_images=2, seed=10, steps=3, output_type="pt")
    assert_same(refined, [pipe.refine(pictures[0], mask, strength=0.6, num_images=2, seed=10, steps=3, output_type="pt"),
                          pipe.refine(pictures[1], mask, strength=0.6, num_images=2, seed=12, steps=3, output_type="pt")])
    extended = pipe.outpaint(pictures, right=4, top=2, seeds=[8, 1], steps=3, output_type="pt")
    assert extended.tokens.shape == (2, 9, 10)
    assert_same(extended, [pipe.outpaint(pictures[0], right=4, top=2, seeds=[8], steps=3, output_type="pt"),
                           pipe.outpaint(pictures[1], right=4, top=2, seeds=[1], steps=3, output_type="pt")])


def test_batches_that_do_not_fit_together_are_refused(pipe, pictures):
    mask = box_mask((16, 16), (0, 0, 8, 8))
    with pytest.raises(InputError, match="got 2 images and 3 masks"):
        pipe.inpaint(pictures, [mask] * 3)
    with pytest.raises(InputError, match="one size, got 16x16, 20x16"):
        pipe.outpaint([pictures[0], pictures[1].resize((20, 16))], right=2)
    with pytest.raises(InputError, match=r"one seed per result \(4\), got 3"):
        pipe.inpaint(pictures, mask, num_images=2, seeds=[1, 2, 3])


def test_seeds_give_the_images_of_separate_calls(pipe):
    batch = pipe(seeds=[5, 9, 2], steps=3, output_type="pt", class_labels=[0, 2, 1])
    assert batch.tokens.shape[0] == 3
    assert_same(batch, [pipe(seeds=np.array([5]), steps=3, output_type="pt", class_labels=0),
                        pipe(seed=9, steps=3, output_type="pt", class_labels=2),
                        pipe(1, seeds=torch.tensor([2]), steps=3, output_type="pt", class_labels=[1])])
    with pytest.raises(InputError, match="seed or seeds"):
        pipe(seed=1, seeds=[1])
    with pytest.raises(InputError, match="integers"):
        pipe(seeds=[1.5])


def test_options_equal_the_same_keywords(pipe, pictures):
    options = pipe.sampling_defaults.replace(steps=3, temperature=0.7, proportion=0.6)
    by_object = pipe(2, seed=1, options=options, output_type="pt")
    assert_same(by_object, [pipe(2, seed=1, steps=3, temperature=0.7, proportion=0.6, output_type="pt")])
    assert_same(pipe(2, seed=1, options=options, steps=2, output_type="pt"),  # keywords override the object
                [pipe(2, seed=1, options=options.replace(steps=2), output_type="pt")])
    mask = box_mask((16, 16), (0, 0, 8, 8))
    inpainting = pipe.sampling_defaults.replace(**INPAINT_DEFAULTS, steps=3)  # keywords start from these
    assert_same(pipe.inpaint(pictures[0], mask, seed=4, options=inpainting, output_type="pt"),
                [pipe.inpaint(pictures[0], mask, seed=4, steps=3, output_type="pt")])


def test_a_callback_gets_copies_and_can_stop_a_call(pipe, pictures):
    full = pipe(2, seed=0, steps=10, early_stop=False, output_type="pt", return_trajectory=True)
    frames = []

    def keep_three(step, tokens, finished):
        frames.append(tokens)
        return step < 2

    stopped = pipe(2, seed=0, steps=10, early_stop=False, output_type="pt", callback=keep_three)
    assert len(frames) == 3 and all(map(torch.equal, frames, full.trajectory[:3]))
    assert torch.equal(stopped.tokens, full.trajectory[2]) and stopped.steps_taken.tolist() == [3, 3]
    assert torch.equal(stopped.images, pipe.decode(stopped.tokens))  # decoded from what it had
    mask = box_mask((16, 16), (0, 0, 8, 8))
    edit = pipe.refine(pictures[0], mask, seed=0, steps=10, output_type="latent", callback=lambda step, *_: step < 1)
    assert edit.steps_taken.tolist() == [2] and edit.images is None


@pytest.mark.parametrize("operation", ["inpaint", "refine", "outpaint"])
def test_every_operation_returns_its_trajectory(pipe, pictures, operation):
    mask = box_mask((16, 16), (4, 4, 12, 12))
    arguments = {"right": 4} if operation == "outpaint" else {"mask": mask}
    result = getattr(pipe, operation)(pictures[0], num_images=2, seed=3, steps=5, early_stop=False,
                                      return_trajectory=True, output_type="latent", **arguments)
    assert len(result.trajectory) == 5 and torch.equal(result.trajectory[-1], result.tokens)
    assert any(not torch.equal(a, b) for a, b in zip(result.trajectory, result.trajectory[1:]))
    _, known = pipe.encode(pictures[0])
    region = (slice(None), slice(0, 8), slice(0, 8))  # where the known tokens are (outpainting adds columns)
    free = torch.zeros(8, 8, dtype=torch.bool) if operation == "outpaint" else token_mask_from_pixels(mask, pipe.factor)
    for frame in result.trajectory:
        assert torch.equal(frame[region][:, ~free], known[:, ~free].expand(2, -1))


def test_the_progress_bar_follows_its_config(tiny_pipeline_dir):
    pipeline = SundaePipeline.from_pretrained(tiny_pipeline_dir, device="cpu")
    shown = io.StringIO()
    pipeline.set_progress_bar_config(disable=False, file=shown, desc="tiny")
    pipeline(1, seed=0, steps=4, early_stop=False, output_type="latent")
    assert "tiny" in shown.getvalue() and "4/4" in shown.getvalue()
    hidden = io.StringIO()
    pipeline.set_progress_bar_config(disable=True, file=hidden)
    pipeline(1, seed=0, steps=4, output_type="latent")
    assert hidden.getvalue() == ""


def test_to_moves_the_running_copies_and_leaves_the_masters_untouched(pictures):
    torch.manual_seed(0)
    tokenizer = VQGAN(VQGANConfig(resolution=16, channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(), z_channels=32, embed_dim=8, codebook_size=16))
    prior = Hourglass(HourglassConfig(codebook_size=16, dim=32, depth=(1, 1, 1), heads=2, head_dim=16,
                                      latent_shape=(8, 8)))
    masters = {name: {key: (tensor.data_ptr(), tensor.clone()) for key, tensor in module.state_dict().items()}
               for name, module in (("prior", prior), ("tokenizer", tokenizer))}
    pipeline = SundaePipeline(prior, tokenizer, precision="bfloat16")
    before = pipeline(2, seed=1, steps=3, output_type="pt")
    assert pipeline.to("meta") is pipeline and pipeline.device == torch.device("meta")
    assert all(parameter.is_meta for parameter in [*pipeline.prior.parameters(), *pipeline.tokenizer.parameters()])
    assert pipeline.prior.to_logits.weight.dtype == torch.bfloat16
    after = pipeline.to("cpu")(2, seed=1, steps=3, output_type="pt")
    assert_same(after, [before])
    for name, module in (("prior", prior), ("tokenizer", tokenizer)):
        for key, tensor in module.state_dict().items():
            address, values = masters[name][key]
            assert tensor.data_ptr() == address and tensor.device.type == "cpu", (name, key)  # not moved
            assert tensor.dtype == values.dtype and torch.equal(tensor, values), (name, key)  # not cast or changed
    assert pipeline.master_prior is prior and pipeline.master_tokenizer is tokenizer
    full = SundaePipeline(prior, tokenizer, precision="float32").to("cpu")  # fp32 copies share the masters' memory
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(full.prior.parameters(), prior.parameters()))
