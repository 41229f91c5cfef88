"""The sampler reproduces upstream `CFM.sample`: time grids, Euler steps, CFG, seeds."""

from types import SimpleNamespace

import pytest
import torch

import upstream
from f5_triton import sampler
from f5_triton.checkpoints import random_dit
from f5_triton.config import ARCHITECTURES


@pytest.fixture(scope="module")
def model():
    return random_dit(ARCHITECTURES["tiny"], seed=0)


def runner_of(model, step=None, embed_text=None, packs: bool = False) -> sampler.StepModel:
    """The DiT behind the sampler's contract (`StepModel`) with the test's own `step` or `embed_text` (counting,
    checking) and its `packs` answer: False, the sampler pads, as for the onnxruntime and TensorRT engines."""
    runner = SimpleNamespace(config=model.config, solver=None, embed_text=embed_text or model.embed_text,
                             step=step or model.step, packs=lambda sequences: packs,
                             cover_shapes=lambda *args, **kwargs: 0)
    assert isinstance(runner, sampler.StepModel)
    return runner


@pytest.fixture(scope="module")
def reference(model):
    dit = upstream.load("model.backbones.dit")
    cfm = upstream.load("model.cfm")
    config = ARCHITECTURES["tiny"]
    kwargs = {k: getattr(config, k) for k in config.__dataclass_fields__}
    ref = cfm.CFM(transformer=dit.DiT(**kwargs)).eval()
    ref.transformer.load_state_dict(model.state_dict())
    return ref


@pytest.mark.parametrize("steps", [5, 6, 7, 10, 12, 16, 32, 9])
@pytest.mark.parametrize("sway", [-1.0, None, 0.5])
def test_time_grid_matches_upstream(steps, sway):
    utils = upstream.load("model.utils")
    expected = utils.get_epss_timesteps(steps, device="cpu", dtype=torch.float32)
    if sway is not None:
        expected = expected + sway * (torch.cos(torch.pi / 2 * expected) - 1 + expected)
    got = sampler.time_grid(steps, sway)
    assert torch.allclose(got, expected, atol=1e-7)
    assert got.shape == (steps + 1,)


@pytest.mark.parametrize("steps,cfg", [(16, 2.0), (7, 2.0), (32, 2.0), (8, 0.0)])
def test_sample_matches_upstream(model, reference, steps, cfg):
    torch.manual_seed(0)
    cond = torch.randn(1, 40, 100)
    text = torch.randint(0, 256, (1, 30))
    expected, _ = reference.sample(cond, text, 100, steps=steps, cfg_strength=cfg, sway_sampling_coef=-1.0, seed=3)
    got = sampler.sample(model, cond, text, 100, steps=steps, cfg_strength=cfg, sway_sampling_coef=-1.0, seed=3)
    assert got.shape == expected.shape == (1, 100, 100)
    assert (got - expected).abs().max() <= 1e-4
    assert torch.equal(got[:, :40], cond)  # reference region restored


def test_duration_is_at_least_text_and_reference_plus_one(model, reference):
    cond = torch.randn(1, 40, 100)
    text = torch.randint(0, 256, (1, 60))
    got = sampler.sample(model, cond, text, 10, steps=4, seed=1)
    expected, _ = reference.sample(cond, text, 10, steps=4, seed=1)
    assert got.shape[1] == expected.shape[1] == 61


def test_batched_equals_single_with_per_request_seeds(model):
    torch.manual_seed(1)
    lens = torch.tensor([40, 60])
    cond = torch.randn(2, 60, 100)
    text = torch.full((2, 40), -1)
    text[0, :25] = torch.randint(0, 256, (25,))
    text[1, :40] = torch.randint(0, 256, (40,))
    duration = torch.tensor([90, 150])
    batched = sampler.sample(model, cond, text, duration, steps=8, seed=[5, 6], lens=lens)
    for i in range(2):
        n_text = int((text[i] != -1).sum())
        alone = sampler.sample(model, cond[i:i + 1, :lens[i]], text[i:i + 1, :n_text], duration[i:i + 1],
                               steps=8, seed=5 + i)
        assert (batched[i, :duration[i]] - alone[0]).abs().max() < 1e-4


def test_explicit_noise_reproduces_seeded_run(model):
    cond, text = torch.randn(1, 30, 100), torch.randint(0, 256, (1, 20))
    seeded = sampler.sample(model, cond, text, 70, steps=4, seed=11)
    noise = sampler.make_noise([70], 100, [11], "cpu", torch.float32)
    explicit = sampler.sample(model, cond, text, 70, steps=4, noise=noise)
    assert torch.equal(seeded, explicit)
    other = sampler.sample(model, cond, text, 70, steps=4, seed=12)
    assert not torch.allclose(seeded, other)


def test_noise_shape_is_checked(model):
    cond, text = torch.randn(1, 30, 100), torch.randint(0, 256, (1, 20))
    with pytest.raises(ValueError, match="noise must have shape"):
        sampler.sample(model, cond, text, 70, steps=2, noise=torch.randn(1, 50, 100))


def test_text_embedding_runs_once_per_call(model):
    calls = {"embed": 0, "step": 0}

    def embed_text(*a, **k):
        calls["embed"] += 1
        return model.embed_text(*a, **k)

    def step(*a, **k):
        calls["step"] += 1
        return model.step(*a, **k)

    sampler.sample(runner_of(model, step, embed_text), torch.randn(2, 30, 100), torch.randint(0, 256, (2, 20)), 60, steps=16, seed=0)
    assert calls == {"embed": 2, "step": 16}  # cond + uncond once; one 2B batch per step


def test_on_step_can_cancel(model):
    class Cancelled(Exception):
        pass

    def on_step(i):
        if i == 3:
            raise Cancelled(f"at step {i}")

    with pytest.raises(Cancelled, match="at step 3"):  # on_step's own exception, passed through unchanged
        sampler.sample(model, torch.randn(1, 30, 100), torch.randint(0, 256, (1, 20)), 60, steps=8, on_step=on_step)


@pytest.mark.parametrize("cfg", [2.0, 0.0])
@pytest.mark.parametrize("durations", [[90, 150, 61], [120, 120], [75]])
def test_packed_batches_equal_padded_and_single(model, cfg, durations):
    """The packed path (the DiT packs) equals the padded path and each request run alone, with and without guidance."""
    b = len(durations)
    torch.manual_seed(2)
    lens = torch.tensor([40, 60, 33][:b])
    cond = torch.randn(b, 60, 100)
    text = torch.full((b, 45), -1)
    for i, n_text in enumerate([25, 45, 10][:b]):
        text[i, :n_text] = torch.randint(0, 256, (n_text,))
    duration = torch.tensor(durations)
    seeds = [11 + i for i in range(b)]
    kwargs = dict(steps=6, cfg_strength=cfg, seed=seeds, lens=lens)
    packed = sampler.sample(model, cond, text, duration, **kwargs)
    padded = sampler.sample(runner_of(model), cond, text, duration, **kwargs)  # the DiT, its `packs` False
    for i in range(b):
        n = int(duration[i])
        assert (packed[i, :n] - padded[i, :n]).abs().max() <= 1e-4
        n_text = int((text[i] != -1).sum())
        alone = sampler.sample(model, cond[i:i + 1, :lens[i]], text[i:i + 1, :n_text], duration[i:i + 1],
                               steps=6, cfg_strength=cfg, seed=seeds[i])
        assert (packed[i, :n] - alone[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("segments", [[1] * 6, [2, 4], [5, 3]])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_solving_in_segments_ends_where_sample_ends(model, segments, packed):
    """`Solving` advanced a few steps at a time (the cohort scheduler's rounds), packed or padded, gives `sample`'s
    mel bit for bit, calls on_step with the grid's own step indices, and hands the step inference tensors only, as
    `sample` does: a tensor made outside inference mode makes a compiled step compile again, while users wait."""
    torch.manual_seed(1)
    cond, text = torch.randn(2, 30, model.mel_dim), torch.randint(0, 200, (2, 12))
    lens, duration, seeds = torch.tensor([20, 11]), torch.tensor([40, 29]), [3, 4]
    seen = []

    def step(x, cond, text_embed, time, mask):
        seen.append(all(t.is_inference() for t in (x, cond, text_embed, time)))
        return model.step(x, cond, text_embed, time, mask)

    runner = runner_of(model, step, packs=packed)
    expected = sampler.sample(runner, cond, text, duration, lens=lens, steps=6, seed=seeds)
    solving = sampler.Solving(runner, sampler.prepare(runner, cond, text, duration, lens=lens, steps=6, seed=seeds))
    calls = []
    for steps in segments:
        solving.advance(steps, on_step=calls.append)
    assert solving.done and calls == list(range(6))
    assert torch.equal(solving.result(), expected)
    assert len(seen) == 12 and all(seen)
