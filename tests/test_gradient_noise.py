import math

import pytest
import torch

from fifa_hf.world.gradient_noise import GradientMoments, measure


def test_the_noise_scale_of_gradients_with_known_mean_and_covariance():
    # g_i = G + e_i with |G|^2 = 4 and tr(Sigma) = 200 x 0.5^2 = 50: B_noise = 12.5.
    generator = torch.Generator().manual_seed(0)
    mean = torch.zeros(200)
    mean[0] = 2.0
    moments = GradientMoments()
    for _ in range(4000):
        moments.add(mean + 0.5 * torch.randn(200, generator=generator))
    noise = moments.result()
    assert noise.examples == 4000
    assert noise.noise == pytest.approx(50.0, rel=0.03)
    assert noise.signal == pytest.approx(4.0, abs=3 * noise.signal_se)
    assert 0 < noise.signal_se < 0.2
    low, high = noise.critical_batch_interval()
    assert low < 12.5 < high
    assert noise.critical_batch == pytest.approx(12.5, rel=0.1)


def test_pure_noise_resolves_no_signal():
    generator = torch.Generator().manual_seed(1)
    moments = GradientMoments()
    for _ in range(1000):
        moments.add(torch.randn(500, generator=generator))
    noise = moments.result()
    assert abs(noise.signal) < 3 * noise.signal_se  # |G|^2 estimated without bias around 0
    assert math.isinf(noise.critical_batch_interval()[1])  # no lower bound on the signal: no upper one on B_noise


def test_identical_gradients_have_zero_noise():
    moments = GradientMoments(chunks=3)
    for _ in range(6):
        moments.add(torch.tensor([3.0, 4.0]))
    noise = moments.result()
    assert noise.noise == pytest.approx(0.0, abs=1e-12)
    assert noise.signal == pytest.approx(25.0)
    assert noise.signal_se == pytest.approx(0.0, abs=1e-12)
    assert noise.critical_batch == 0.0


def test_measure_backpropagates_each_examples_loss():
    weight = torch.nn.Parameter(torch.zeros(3))
    rows = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]), torch.tensor([1.0, 2.0, 2.0])]
    moments = GradientMoments(chunks=3)
    noise = measure((lambda row=row: (weight * row).sum() for row in rows), [weight], moments, total=len(rows))
    # The gradient of (w . row) is row: the sum (2, 4, 2), squared norms 1, 4 and 9 (14 in all).
    assert noise.signal == pytest.approx((24 - 14) / 6)  # products of two different examples' gradients
    assert noise.noise == pytest.approx((14 - 3 * 24 / 9) / 2)


def test_too_few_examples_or_chunks_are_refused():
    moments = GradientMoments()
    moments.add(torch.ones(2))
    with pytest.raises(ValueError, match="at least 8 examples"):
        moments.result()
    with pytest.raises(ValueError, match="at least 3 chunks"):
        GradientMoments(chunks=2)


def test_diffusion_dpo_and_sft_gradients_of_a_world_are_measured_per_pair_visit(tiny_sd_path):
    from fifa_hf.world.gradient_noise import diffusion_dpo_gradient_noise

    dpo = diffusion_dpo_gradient_noise(200, "oracle", sft=False, examples=8, model=tiny_sd_path, num_pairs=150)
    sft = diffusion_dpo_gradient_noise(200, "oracle", sft=True, examples=8, model=tiny_sd_path, num_pairs=150)
    assert dpo.examples == sft.examples == 8
    assert dpo.noise > 0 and sft.noise > 0
    assert dpo.noise != pytest.approx(sft.noise)  # two losses, two gradients
