"""Tests for trainer/losses.py: hand-derived values, stop-gradient checks, JVP vs finite differences, LPIPS."""

import pytest
import torch
from torch import nn

from trainer.losses import (
    DISTANCE_NAMES,
    LPIPSDistance,
    cmt_cm_loss,
    cmt_mf_loss,
    distance,
    ect_loss,
    ect_target,
    guided_velocity,
    ict_pseudo_huber_c,
    meanflow_loss,
    meanflow_target,
    pseudo_huber,
    secant_derivative,
    squared_l2,
    total_derivative_fd,
    total_derivative_jvp,
)
from trainer.methods.meanflow import jvp_attention_context

torch.set_num_threads(1)


def test_squared_l2_sums_over_every_non_batch_element():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    expected = torch.tensor([1.0 + 4.0, 9.0 + 16.0])
    assert torch.equal(squared_l2(a, b), expected)
    assert torch.equal(squared_l2(a.view(2, 1, 1, 2), b.view(2, 1, 1, 2)), expected)  # image-shaped input, same sum


def test_squared_l2_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        squared_l2(torch.zeros(2, 3), torch.zeros(2, 4))


def test_pseudo_huber_hand_values():
    a = torch.tensor([[2.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    # ‖a − b‖² = [24, 0]; √(24 + 1) − 1 = 4 and √(0 + 1) − 1 = 0
    assert torch.allclose(pseudo_huber(a, b, c=1.0), torch.tensor([4.0, 0.0]))
    # c = 0 is the plain L2 norm √24
    assert pseudo_huber(a[:1], b[:1], c=0.0).item() == pytest.approx(24.0**0.5)
    with pytest.raises(ValueError, match="c must be >= 0"):
        pseudo_huber(a, b, c=-1.0)


def test_pseudo_huber_default_c_is_icts_dimension_scaled_constant():
    # iCT: c = 0.00054·√d; CIFAR-10 has d = 3·32·32 = 3072 and √3072 = 55.4256, so c ≈ 0.029930
    assert ict_pseudo_huber_c(3072) == pytest.approx(0.029930, rel=1e-4)
    a = torch.tensor([[3.0, 0.0, 0.0, 4.0]])  # d = 4 → c = 0.00108, ‖a‖² = 25
    c = 0.00054 * 2.0
    assert pseudo_huber(a, torch.zeros_like(a)).item() == pytest.approx((25.0 + c * c) ** 0.5 - c, rel=1e-6)


def test_distance_factory_names_and_errors():
    a = torch.tensor([[2.0, 2.0, 4.0]])
    zero = torch.zeros_like(a)
    assert distance("squared_l2")(a, zero).item() == 24.0
    assert distance("pseudo_huber", c=1.0)(a, zero).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="unknown distance 'lpip'.*squared_l2, pseudo_huber, lpips"):
        distance("lpip")
    with pytest.raises(ValueError, match="takes only `c`"):
        distance("pseudo_huber", scale=2.0)
    with pytest.raises(ValueError, match="weights"):
        distance("lpips", weights_path=None)
    assert DISTANCE_NAMES == ("squared_l2", "pseudo_huber", "lpips")


def test_cmt_cm_loss_hand_values_and_gradient_reaches_both_sides():
    f_pred = torch.tensor([[1.0, 1.0], [2.0, 0.0]], requires_grad=True)
    x0_target = torch.tensor([[0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    loss = cmt_cm_loss(f_pred, x0_target, squared_l2)
    assert torch.equal(loss.detach(), torch.tensor([1.0, 4.0]))
    loss.sum().backward()
    # d/df Σ(f − x)² = 2(f − x); CMT has no stop-gradient, so the target side receives −2(f − x)
    assert torch.equal(f_pred.grad, torch.tensor([[2.0, 0.0], [4.0, 0.0]]))
    assert torch.equal(x0_target.grad, torch.tensor([[-2.0, 0.0], [-4.0, 0.0]]))


def test_cmt_cm_loss_with_pseudo_huber_distance():
    f_pred = torch.tensor([[2.0, 2.0, 4.0]])
    loss = cmt_cm_loss(f_pred, torch.zeros_like(f_pred), distance("pseudo_huber", c=1.0))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(4.0)


def test_cmt_mf_loss_hand_values():
    h_pred = torch.tensor([[1.0, 2.0], [0.0, 8.0]])
    x_i = torch.tensor([[3.0, 1.0], [0.0, 4.0]])
    x_j = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    t_i = torch.tensor([0.75, 0.5], dtype=torch.float64)  # float64 times (as stored) with float32 states
    t_j = torch.tensor([0.25, 0.0], dtype=torch.float64)
    # targets: (2, 0)/0.5 = (4, 0) and (0, 4)/0.5 = (0, 8); errors (−3, 2) and (0, 0)
    loss = cmt_mf_loss(h_pred, x_i, x_j, t_i=t_i, t_j=t_j)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, torch.tensor([13.0, 0.0]))
    # the average velocity is symmetric in (i, j)
    assert torch.allclose(cmt_mf_loss(h_pred, x_j, x_i, t_i=t_j, t_j=t_i), loss)
    # one time for the whole batch broadcasts
    assert torch.allclose(cmt_mf_loss(h_pred[:1], x_i[:1], x_j[:1], t_i=0.75, t_j=0.25), torch.tensor([13.0]))


def test_cmt_mf_loss_guards_equal_times_and_bad_time_shapes():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="t_i != t_j"):
        cmt_mf_loss(x, x, x, t_i=torch.tensor([0.5, 0.3]), t_j=torch.tensor([0.5, 0.1]))
    with pytest.raises(ValueError, match="one time per sample"):
        cmt_mf_loss(x, x, x, t_i=torch.tensor([0.5, 0.3, 0.2]), t_j=torch.tensor([0.1, 0.1, 0.1]))


def test_ect_target_uses_clean_sample_where_r_is_zero_and_is_detached():
    f_r = torch.tensor([[5.0, 5.0], [6.0, 6.0]], requires_grad=True)
    x0 = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    target = ect_target(f_r, x0, r=torch.tensor([0.0, 0.3]))
    assert torch.equal(target, torch.tensor([[1.0, 1.0], [6.0, 6.0]]))
    assert not target.requires_grad


def test_ect_loss_pseudo_huber_hand_values_and_no_gradient_through_f_r():
    f_t = torch.tensor([[2.0, 2.0, 4.0], [2.0, 2.0, 0.0]], requires_grad=True)
    f_r = torch.zeros(2, 3, requires_grad=True)
    t = torch.tensor([1.0, 0.5])
    r = torch.tensor([0.5, 0.25])
    loss = ect_loss(f_t, f_r, t=t, r=r, weighting="pseudo_huber", c=1.0)
    # Δ² = [24, 8]: (√25 − 1)/0.5 = 8 and (√9 − 1)/0.25 = 8
    assert torch.allclose(loss, torch.tensor([8.0, 8.0]))
    loss.sum().backward()
    assert f_r.grad is None  # the target side carries no gradient
    # d/df_t = (f_t − f_r)/√(Δ² + c²)/(t − r): (2, 2, 4)/5/0.5 and (2, 2, 0)/3/0.25
    expected = torch.tensor([[0.8, 0.8, 1.6], [8.0 / 3.0, 8.0 / 3.0, 0.0]])
    assert torch.allclose(f_t.grad, expected)


def test_ect_loss_power_weighting_hand_values_and_gradient():
    f_t = torch.tensor([[2.0, 2.0, 4.0], [2.0, 2.0, 0.0]], requires_grad=True)
    f_r = torch.zeros(2, 3, requires_grad=True)
    loss = ect_loss(f_t, f_r, t=torch.tensor([1.0, 0.5]), r=torch.tensor([0.5, 0.25]), weighting="power", p=0.5,
                    c=1.0)
    # Δ²/(Δ² + 1)^0.5/(t − r): 24/5/0.5 = 9.6 and 8/3/0.25 = 32/3
    assert torch.allclose(loss, torch.tensor([9.6, 32.0 / 3.0]))
    loss.sum().backward()
    assert f_r.grad is None
    # the weight is under stop-gradient: d/df_t = 2(f_t − f_r)/(Δ² + 1)^0.5/(t − r)
    assert torch.allclose(f_t.grad, torch.tensor([[1.6, 1.6, 3.2], [16.0 / 3.0, 16.0 / 3.0, 0.0]]))


def test_ect_loss_rejects_t_not_above_r_and_unknown_weighting():
    x = torch.ones(2, 2)
    with pytest.raises(ValueError, match="t > r"):
        ect_loss(x, x, t=torch.tensor([1.0, 0.5]), r=torch.tensor([0.5, 0.5]), c=1.0)
    with pytest.raises(ValueError, match="unknown ECT weighting"):
        ect_loss(x, x, t=1.0, r=0.5, weighting="huber")


def test_meanflow_target_hand_values_and_stop_gradient():
    v = torch.tensor([[1.0, 2.0]])
    du_dt = torch.tensor([[4.0, -2.0]], requires_grad=True)
    target = meanflow_target(v, du_dt, t=torch.tensor([0.75]), r=torch.tensor([0.25]))
    # v − (t − r)·du/dt = (1, 2) − 0.5·(4, −2) = (−1, 3)
    assert torch.equal(target, torch.tensor([[-1.0, 3.0]]))
    assert not target.requires_grad


def test_meanflow_loss_hand_values_and_weight_carries_no_gradient():
    u_pred = torch.tensor([[1.0, 2.0], [4.0, 0.0]], requires_grad=True)
    u_tgt = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = meanflow_loss(u_pred, u_tgt, p=1.0, c=1.0)
    # ‖e‖² = [4, 9]; w = 1/(‖e‖² + 1) → losses 4/5 and 9/10
    assert torch.allclose(loss, torch.tensor([0.8, 0.9]))
    loss.sum().backward()
    assert u_tgt.grad is None
    # gradient sg(w)·2e = 2·(0, 2)/5 and 2·(3, 0)/10; a differentiated weight would give c·2e/(‖e‖² + c)² instead
    assert torch.allclose(u_pred.grad, torch.tensor([[0.0, 0.8], [0.6, 0.0]]))
    # p = 0 is the plain squared error
    assert torch.allclose(meanflow_loss(u_pred, u_tgt, p=0.0), torch.tensor([4.0, 9.0]))
    with pytest.raises(ValueError, match="c must be > 0"):
        meanflow_loss(u_pred, u_tgt, c=0.0)


def test_guided_velocity_hand_values():
    v_cond = torch.tensor([[1.0, 1.0]])
    v_uncond = torch.tensor([[3.0, 0.0]])
    assert torch.equal(guided_velocity(v_cond, v_uncond, 2.0), torch.tensor([[-1.0, 2.0]]))  # 2·v_c − v_u
    assert torch.equal(guided_velocity(v_cond, v_uncond, 1.0), v_cond)


def test_total_derivative_jvp_matches_hand_derivative():
    def u_fn(z, *, t, r):
        return z * t[:, None] ** 2 + r[:, None] * z

    z = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    v = torch.tensor([[2.0, 1.0], [-1.0, 0.0]])
    r = torch.tensor([0.1, 0.2])
    t = torch.tensor([0.5, 0.9])
    u, du_dt = total_derivative_jvp(u_fn, z, t=t, r=r, v=v)
    # d/dt u = v·∂_z u + ∂_t u = v·(t² + r) + 2·t·z (r held fixed)
    expected = v * (t[:, None] ** 2 + r[:, None]) + 2 * t[:, None] * z
    assert torch.allclose(u, u_fn(z, t=t, r=r))
    assert torch.allclose(du_dt, expected)


class SmoothAverageVelocity(nn.Module):
    """Small smooth u_θ(z, t, r): an MLP on [z, r, t] with tanh activations."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, dim))

    def forward(self, z, *, t, r):
        return self.net(torch.cat([z, r[:, None], t[:, None]], dim=1))


def test_jvp_and_central_difference_agree_on_a_smooth_module():
    torch.manual_seed(0)
    model = SmoothAverageVelocity(dim=6)
    z, v = torch.randn(8, 6), torch.randn(8, 6)
    r = torch.rand(8) * 0.4
    t = r + 0.2 + torch.rand(8) * 0.3
    u_jvp, du_jvp = total_derivative_jvp(model, z, t=t, r=r, v=v)
    u_fd, du_fd = total_derivative_fd(model, z, t=t, r=r, v=v, delta=1e-3)
    relative_error = ((du_jvp - du_fd).norm() / du_jvp.norm()).item()
    assert relative_error <= 1e-2, relative_error
    assert torch.allclose(u_jvp, u_fd)
    # u keeps the graph to the parameters; du/dt is detached (MeanFlow stops its gradient)
    assert u_jvp.requires_grad and u_fd.requires_grad
    assert not du_jvp.requires_grad and not du_fd.requires_grad
    u_jvp.sum().backward()
    assert model.net[0].weight.grad is not None and model.net[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="delta must be > 0"):
        total_derivative_fd(model, z, t=t, r=r, v=v, delta=0.0)


def test_secant_derivative_is_the_windows_slope_one_sided_at_r_and_t_max():
    # u(z, t, r) = a·z + t²·b + r: along z' = v the total derivative is a·v + 2t·b; the slope of a quadratic over a
    # symmetric window is exact, and over [t − δ₋, t + δ₊] it is a·v + (2t + δ₊ − δ₋)·b (hand computation)
    torch.manual_seed(0)
    a, b = 0.7, torch.randn(1, 5, dtype=torch.float64)
    z, v = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)

    def u_fn(z_in, *, t, r):
        return a * z_in + t[:, None] ** 2 * b + r[:, None]

    delta, t_max = 0.05, 0.9
    t = torch.tensor([0.5, 0.9, 0.32, 0.9], dtype=torch.float64)
    r = torch.tensor([0.1, 0.2, 0.3, 0.9], dtype=torch.float64)
    ahead = torch.tensor([0.05, 0.0, 0.05, 0.0], dtype=torch.float64)  # δ₊ = min(δ, t_max − t)
    behind = torch.tensor([0.05, 0.05, 0.02, 0.0], dtype=torch.float64)  # δ₋ = min(δ, t − r)
    slope = secant_derivative(u_fn, z, t=t, r=r, v=v, delta=delta, t_max=t_max)
    expected = a * v + (2 * t + ahead - behind)[:, None] * b
    expected[3] = 0.0  # t = r = t_max: an empty window, and MeanFlow multiplies du/dt by t − r = 0
    assert torch.allclose(slope, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    assert torch.allclose(slope[0], a * v[0] + 2 * t[0] * b[0], rtol=1e-9)  # interior: the exact derivative
    assert not slope.requires_grad
    with pytest.raises(ValueError, match="half-width delta must be > 0"):
        secant_derivative(u_fn, z, t=t, r=r, v=v, delta=0.0, t_max=t_max)


def test_a_wide_secant_ignores_wiggles_the_jvp_follows():
    # u = z + sin(1000 t)/1000·b: the local derivative carries cos(1000 t)·b (size |b|), the slope over ±0.05 does not
    b = torch.ones(1, 3, dtype=torch.float64)
    z, v = torch.zeros(6, 3, dtype=torch.float64), torch.zeros(6, 3, dtype=torch.float64)
    t = torch.linspace(0.3, 0.6, 6, dtype=torch.float64)
    r = torch.zeros(6, dtype=torch.float64)

    def u_fn(z_in, *, t, r):
        return z_in + torch.sin(1000 * t)[:, None] / 1000 * b

    _, local = total_derivative_jvp(u_fn, z, t=t, r=r, v=v)
    wide = secant_derivative(u_fn, z, t=t, r=r, v=v, delta=0.05, t_max=1.0)
    assert torch.allclose(local, torch.cos(1000 * t)[:, None] * b)
    assert float(wide.abs().max()) <= 2 / (1000 * 0.1) + 1e-12  # |Δ sin|/1000 over a window of width 0.1


def test_jvp_through_a_diffusers_unet_with_attention_inside_the_context():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).double()

    def u_fn(z, *, t, r):
        return unet(z, t + r).sample  # r enters through the time input so ∂_r would matter if its tangent were not 0

    z, v = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    r, t = torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([0.5, 0.7], dtype=torch.float64)
    with jvp_attention_context(unet):
        _, du_jvp = total_derivative_jvp(u_fn, z, t=t, r=r, v=v)
    _, du_fd = total_derivative_fd(u_fn, z, t=t, r=r, v=v, delta=1e-5)
    assert ((du_jvp - du_fd).norm() / du_jvp.norm()).item() < 1e-4
    # the temporary GroupNorm hooks are gone after the context
    assert all(not layer._forward_pre_hooks for layer in unet.modules() if isinstance(layer, nn.GroupNorm))


# --------------------------------------------------------------------------------------------- LPIPS


def test_lpips_missing_weights_file_gives_instructions(tmp_path):
    missing = tmp_path / "lpips_vgg.safetensors"
    with pytest.raises(ValueError, match="not found") as raised:
        LPIPSDistance(missing)
    message = str(raised.value)
    assert str(missing) in message
    assert "torchvision" in message and "lin0.model.1.weight" in message and "features.0.weight" in message
    with pytest.raises(ValueError, match="needs `weights_path`"):
        LPIPSDistance(None)


def test_lpips_file_without_the_expected_keys_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "partial.safetensors"
    save_file({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, str(path))
    with pytest.raises(ValueError, match="lacks 30 key"):
        LPIPSDistance(path)


@pytest.fixture(scope="module")
def random_lpips_weights(tmp_path_factory):
    """A weights file in the documented layout with a random trunk and random positive linear layers."""
    from safetensors.torch import save_file

    from trainer.losses import _vgg16_trunk

    torch.manual_seed(0)
    trunk = _vgg16_trunk()
    state = {f"features.{name}": tensor.contiguous() for name, tensor in trunk.state_dict().items()}
    for k, channels in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{k}.model.1.weight"] = torch.rand(1, channels, 1, 1)
    folder = tmp_path_factory.mktemp("lpips")
    save_file(state, str(folder / "base.safetensors"))
    doubled = {key: (2 * value if key.startswith("lin") else value) for key, value in state.items()}
    save_file(doubled, str(folder / "doubled_lins.safetensors"))
    return folder


def test_lpips_distance_properties_with_a_random_network(random_lpips_weights):
    lpips = LPIPSDistance(random_lpips_weights / "base.safetensors", resize_to=32)
    doubled = LPIPSDistance(random_lpips_weights / "doubled_lins.safetensors", resize_to=32)
    torch.manual_seed(1)
    a = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    b = torch.rand(2, 3, 16, 16) * 2 - 1
    d_ab = lpips(a, b)
    assert d_ab.shape == (2,)
    assert bool((d_ab > 0).all())
    assert torch.allclose(lpips(b, b), torch.zeros(2))
    assert torch.allclose(lpips(b, a.detach()), d_ab.detach(), rtol=1e-5)  # symmetric
    assert torch.allclose(doubled(a.detach(), b), 2 * d_ab.detach(), rtol=1e-5)  # linear in the learned weights
    d_ab.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(not parameter.requires_grad for parameter in lpips.parameters())


def test_lpips_grey_images_equal_their_rgb_repeat_and_small_images_need_resize(random_lpips_weights):
    lpips = LPIPSDistance(random_lpips_weights / "base.safetensors", resize_to=16)
    torch.manual_seed(2)
    grey_a, grey_b = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.allclose(lpips(grey_a, grey_b), lpips(grey_a.repeat(1, 3, 1, 1), grey_b.repeat(1, 3, 1, 1)))
    no_resize = LPIPSDistance(random_lpips_weights / "base.safetensors", resize_to=None)
    with pytest.raises(ValueError, match="pass resize_to"):
        no_resize(grey_a, grey_b)
