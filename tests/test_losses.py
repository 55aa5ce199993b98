"""Each method's loss is a pure function; each is checked on a case whose answer is known."""

import torch

from methods import diffusion as D
from methods.add import add_distillation_loss
from methods.dmd2 import dm_loss
from methods.imagine_flash import distillation_loss
from methods.lcm import consistency, consistency_loss
from methods.progressive import snr_weighted_x_loss

S = D.Schedule.scaled_linear()


def test_lcm_consistency_function_boundary_and_grid():
    x, x0 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(consistency(x, x0, torch.tensor([0, 0])), x)  # f(x, 0) = x
    assert torch.allclose(consistency(x, x0, torch.tensor([999, 999])), x0, atol=1e-4)
    g = S.solver_grid(50)
    assert g[0] == 19 and g[-1] == 999 and len(g) == 50 and set((g[1:] - g[:-1]).tolist()) == {20}


def test_lcm_losses():
    a = torch.randn(3, 3, 4, 4)
    assert consistency_loss(a, a, "l2") == 0 and consistency_loss(a, a, "huber") == 0
    b = a + 1.0
    assert torch.isclose(consistency_loss(a, b, "l2"), torch.tensor(1.0))
    c = 0.001
    assert torch.isclose(consistency_loss(a, b, "huber", c), torch.tensor((1 + c * c) ** 0.5 - c))


def test_add_distillation_weight_is_alpha_bar():
    x_s = torch.ones(3, 3, 4, 4, requires_grad=True)
    x_t = torch.zeros(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    loss = add_distillation_loss(x_s, x_t, t, S)
    assert torch.isclose(loss, S.alpha_bar[t].float().mean())
    loss.backward()
    assert x_s.grad is not None  # the teacher side is stop-gradient by construction (no grad to it)


def test_dmd_loss_gradient_is_the_normalised_score_difference_mean_reduced():
    """As tianweiy/DMD2: 0.5·mse(x, sg(x − grad), reduction="mean"), so the gradient per element is the
    normalised score difference over the element count (a sum would give λ_gan ~1/numel of its weight)."""
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    real, fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    dm_loss(x0, real, fake).backward()
    norm = (x0.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    expected = (fake - real) / norm / x0.numel()
    assert torch.allclose(x0.grad, expected, atol=1e-7)
    big = torch.randn(2, 3, 8, 8, requires_grad=True)  # the loss does not grow with the image size
    assert dm_loss(big, big.detach() + 1, big.detach()).item() < 1.0


def test_progressive_weight_is_truncated_snr():
    x, y = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    assert torch.isclose(snr_weighted_x_loss(x, y, 999, S), torch.tensor(1.0))  # SNR < 1 -> weight 1
    assert torch.isclose(snr_weighted_x_loss(x, y, 10, S), S.snr(10).float())  # SNR > 1 -> weight SNR


def test_imagine_flash_distillation_loss_stops_gradient_at_the_target():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    distillation_loss(s, t).backward()
    assert s.grad is not None and t.grad is None
