"""FlowMapStudent: init equals the teacher (x0 prediction and velocity), boundary condition, sampling, export."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from pipeline.teacher import Teacher
from tests.helpers import assert_close, tiny_unet
from trainer.student import FlowMapStudent, StudentLoadError


SCHEDULERS = {
    "vp-epsilon": lambda: DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    "vp-v": lambda: DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"),
    "edm": lambda: EDMEulerScheduler(),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
}


def tiny_teacher(kind: str = "vp-epsilon", num_class_embeds: int | None = None) -> Teacher:
    """A Teacher around a tiny random UNet with the given schedule family / prediction type."""
    return Teacher(tiny_unet(num_class_embeds=num_class_embeds), SCHEDULERS[kind]())


def edm_levels(teacher: Teacher) -> torch.Tensor:
    """A spread of EDM levels σ̃ inside the teacher's schedule."""
    lo, hi = teacher.sigma_edm_range
    return torch.tensor([max(lo, 0.01) * 1.5, 0.2, 1.0, 5.0, min(hi, 80.0)], dtype=torch.float64)


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_cm_form_at_init_is_the_teachers_x0_prediction(kind):
    teacher = tiny_teacher(kind)
    student = FlowMapStudent.from_teacher(teacher, parameterization="teacher")
    sigma = edm_levels(teacher)
    x_edm = torch.randn(len(sigma), 1, 8, 8) * (1 + sigma.float()).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        f = student.denoise(x_edm, sigma)
    expected = teacher.denoise(x_edm, sigma.numpy())
    scale = expected.abs().max().item()
    assert torch.allclose(f, expected, atol=1e-5 * max(scale, 1.0), rtol=1e-5), (f - expected).abs().max()


def test_conditional_cm_student_matches_teacher_with_labels():
    teacher = tiny_teacher("vp-epsilon", num_class_embeds=10)
    student = FlowMapStudent.from_teacher(teacher, parameterization="teacher")
    x = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([1, 4, 9])
    with torch.no_grad():
        f = student.denoise(x, 0.7, labels=labels)
    assert_close(f, teacher.denoise(x, 0.7, labels=labels), what="conditional CM student at init")
    with pytest.raises(ValueError, match="pass labels"):
        student.denoise(x, 0.7)


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_mf_form_at_init_is_the_teachers_velocity_for_any_r(kind):
    teacher = tiny_teacher(kind)
    student = FlowMapStudent.from_teacher(teacher, second_time_input=True, parameterization="teacher")
    tau = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    z = torch.randn(4, 1, 8, 8)
    sigma = tau / (1 - tau)
    x0 = teacher.denoise(z / (1 - tau.float()).reshape(-1, 1, 1, 1), sigma.numpy())
    teacher_velocity = (z - x0) / tau.float().reshape(-1, 1, 1, 1)  # ε̂ − x̂0 = (z − x̂0)/τ
    with torch.no_grad():
        for r in (None, tau * 0.0, tau * 0.5, tau * 0.99):
            u = student.velocity(z, t=tau, r=r)
            assert torch.allclose(u, teacher_velocity, atol=2e-4, rtol=1e-4), (r, (u - teacher_velocity).abs().max())
    assert student.second_time.embedding.linear_2.weight.abs().sum() == 0  # the (t − r) embedding starts at zero
    assert dict(student.net.config) == dict(teacher.model.config)  # the net keeps the teacher's architecture


def test_forward_dispatches_to_both_forms():
    student = FlowMapStudent.from_teacher(tiny_teacher(), second_time_input=True)
    x, level = torch.randn(2, 1, 8, 8), torch.tensor([0.4, 2.0])
    with torch.no_grad():
        assert torch.equal(student("cm", x, level), student.denoise(x, level))
        assert torch.equal(student("mf", x, t=level / 3, r=level / 6), student.velocity(x, t=level / 3, r=level / 6))
    with pytest.raises(ValueError, match="form must be"):
        student("ect", x, level)


def test_second_time_input_changes_u_once_trained():
    student = FlowMapStudent.from_teacher(tiny_teacher(), second_time_input=True)
    torch.nn.init.normal_(student.second_time.embedding.linear_2.weight, std=0.1)
    z, tau = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        assert not torch.allclose(student.velocity(z, t=tau, r=tau * 0), student.velocity(z, t=tau, r=tau))


def test_second_time_input_gets_gradients():
    student = FlowMapStudent.from_teacher(tiny_teacher(), second_time_input=True)
    z, tau = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.7])
    student.velocity(z, t=tau, r=tau * 0.2).pow(2).sum().backward()
    assert student.second_time.embedding.linear_2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_boundary_condition_holds_exactly_even_for_random_init(kind):
    student = FlowMapStudent.from_teacher(tiny_teacher(kind), init="random", seed=3)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(student.denoise(x, 0.0), x)
        mixed = student.denoise(x, torch.tensor([0.0, 0.5, 0.0, 2.0]))
    assert torch.equal(mixed[[0, 2]], x[[0, 2]])
    assert not torch.equal(mixed[1], x[1])


def test_boundary_is_continuous_near_zero_for_vp_epsilon():
    """c_skip → 1, c_out → 0: f(x, σ̃) → x as σ̃ → 0 (here c_out = −σ̃ exactly)."""
    student = FlowMapStudent.from_teacher(tiny_teacher("vp-epsilon"), parameterization="teacher")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        gaps = [(student.denoise(x, s) - x).abs().max().item() for s in (1e-1, 1e-2, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2


def test_random_init_differs_from_teacher_and_is_seeded():
    teacher = tiny_teacher()
    a = FlowMapStudent.from_teacher(teacher, init="random", seed=1)
    b = FlowMapStudent.from_teacher(teacher, init="random", seed=1)
    c = FlowMapStudent.from_teacher(teacher, init="teacher")
    key = "conv_in.weight"
    assert torch.equal(a.net.state_dict()[key], b.net.state_dict()[key])
    assert not torch.equal(a.net.state_dict()[key], c.net.state_dict()[key])
    assert torch.equal(c.net.state_dict()[key], teacher.model.state_dict()[key])


def test_one_and_two_step_sampling_match_their_definitions():
    teacher = tiny_teacher()
    cm = FlowMapStudent.from_teacher(teacher, parameterization="teacher")
    noise = torch.randn(3, 1, 8, 8)
    sigma_max = cm.default_sigma_max()
    x_max = noise * (1 + sigma_max**2) ** 0.5  # [3, 1, 8, 8], |x̃| up to ~4·80: float32 rounding scales with it
    one = cm.sample(noise, 1)
    expected = teacher.denoise(x_max, sigma_max)
    assert_close(one, expected, magnitude=float(x_max.abs().max()), what="1-step CM sample")
    two = cm.sample(noise, 2, intermediate=0.5, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0))
    assert_close(two, teacher.denoise(one + 0.5 * fresh, 0.5), what="2-step CM sample")

    mf = FlowMapStudent.from_teacher(teacher, second_time_input=True, parameterization="teacher")
    z0 = mf.sample(noise, 1)
    tau_max = sigma_max / (1 + sigma_max)
    z_t = noise * (1 + sigma_max**2) ** 0.5 / (1 + sigma_max)
    with torch.no_grad():
        u_max = mf.velocity(z_t, t=tau_max, r=0.0)  # [3, 1, 8, 8], the teacher's velocity: up to ~(1+σ̃)·|ε̂|
        manual = z_t - tau_max * u_max
        assert_close(z0, manual, magnitude=float(u_max.abs().max()), what="1-step MF sample")
        z_mid = z_t - (tau_max - 0.4) * mf.velocity(z_t, t=tau_max, r=0.4)
        u_mid = mf.velocity(z_mid, t=0.4, r=0.0)
        manual_two = z_mid - 0.4 * u_mid
    magnitude = max(float(u_max.abs().max()), float(u_mid.abs().max()))
    assert_close(mf.sample(noise, 2, intermediate=0.4), manual_two, magnitude=magnitude, what="2-step MF sample")
    # at init the MF 1-step map equals the teacher's x0 prediction at τ_max (z − τ·v = x̂0)
    assert_close(z0, one, magnitude=magnitude, what="MF 1-step vs CM 1-step at init")
    with pytest.raises(ValueError, match="steps must be 1 or 2"):
        cm.sample(noise, 3)


@pytest.mark.parametrize("second_time_input", [False, True])
def test_save_and_load_round_trip(tmp_path, second_time_input):
    teacher = tiny_teacher()
    student = FlowMapStudent.from_teacher(teacher, second_time_input=second_time_input)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    student.save_pretrained(tmp_path / "export")
    loaded = FlowMapStudent.from_pretrained(tmp_path / "export")
    assert loaded.second_time_input == second_time_input
    assert loaded.teacher_fingerprint == teacher.fingerprint
    assert loaded.prediction_type == "epsilon" and loaded.sample_shape == (1, 8, 8)
    assert student.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    z, tau = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(student.velocity(z, t=tau, r=tau / 2), loaded.velocity(z, t=tau, r=tau / 2))
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_bad_directories_give_clear_errors(tmp_path):
    teacher = tiny_teacher()
    with pytest.raises(StudentLoadError, match="not a student export"):
        FlowMapStudent.from_pretrained(tmp_path)
    teacher.model.save_pretrained(tmp_path / "teacher_unet")
    with pytest.raises(StudentLoadError, match="looks like a diffusers teacher"):
        FlowMapStudent.from_pretrained(tmp_path / "teacher_unet")

    export = FlowMapStudent.from_teacher(teacher).save_pretrained(tmp_path / "cm")
    with pytest.raises(StudentLoadError, match="second_time_input=False"):
        FlowMapStudent.from_pretrained(export, second_time_input=True)

    meta_file = export / "student.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "time_convention": "EDM σ only"}))
    with pytest.raises(StudentLoadError, match="another time convention"):
        FlowMapStudent.from_pretrained(export)
    meta_file.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(StudentLoadError, match="re-export"):
        FlowMapStudent.from_pretrained(export)
    meta_file.write_text("{not json")
    with pytest.raises(StudentLoadError, match="not valid JSON"):
        FlowMapStudent.from_pretrained(export)


def test_conditional_unet_takes_a_second_time_input_and_starts_as_the_teacher():
    """A class-conditional UNet keeps its labels in the class slot; (t − r) is added to the time embedding."""
    teacher = tiny_teacher("vp-v", num_class_embeds=10)
    student = FlowMapStudent.from_teacher(teacher, second_time_input=True, parameterization="teacher")
    tau, labels = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64), torch.tensor([1, 4, 9])
    z = torch.randn(3, 1, 8, 8)
    x0 = teacher.denoise(z / (1 - tau.float()).reshape(-1, 1, 1, 1), (tau / (1 - tau)).numpy(), labels=labels)
    teacher_velocity = (z - x0) / tau.float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        for r in (None, tau * 0.0, tau * 0.5):
            assert_close(student.velocity(z, t=tau, r=r, labels=labels), teacher_velocity, ulps=256,
                         magnitude=float(teacher_velocity.abs().max()), what=f"conditional u at r={r}")
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\)"):
        student.velocity(z, t=tau, labels=torch.tensor([1, 4, 10]))


def test_architectures_without_a_fractional_time_embedding_are_refused_by_name():
    from diffusers import UNet2DModel

    learned = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                          layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, time_embedding_type="learned",
                          num_train_timesteps=1000)
    teacher = Teacher(learned, DDPMScheduler())
    with pytest.raises(StudentLoadError, match=r"time_embedding_type='learned'.*supports UNet2DModel.*DiTTransformer"):
        FlowMapStudent.from_teacher(teacher, second_time_input=True)
    with pytest.raises(ValueError, match="init must be"):
        FlowMapStudent.from_teacher(tiny_teacher(), init="zeros")


def test_format_2_mf_exports_load_with_the_same_network_function(tmp_path):
    """Format 2 kept (t − r) in the UNet's class_embed_type="timestep" slot; loading moves it beside the net, exactly."""
    from diffusers import UNet2DModel

    teacher = tiny_teacher()
    config = {key: value for key, value in teacher.model.config.items() if not key.startswith("_")}
    old_net = UNet2DModel(**{**config, "class_embed_type": "timestep"})
    old_net.load_state_dict(teacher.model.state_dict(), strict=False)
    torch.nn.init.normal_(old_net.class_embedding.linear_2.weight, std=0.1)
    export = tmp_path / "format2"
    old_net.save_pretrained(export / "unet")
    teacher.scheduler.save_pretrained(export / "scheduler")
    meta = FlowMapStudent.from_teacher(teacher, second_time_input=True).metadata()
    meta = {key: value for key, value in meta.items() if key != "latent"} | {"format_version": 2}
    (export / "student.json").write_text(json.dumps(meta))
    loaded = FlowMapStudent.from_pretrained(export)
    x, timesteps, gap = torch.randn(3, 1, 8, 8), torch.tensor([100.0, 500.0, 900.0]), torch.tensor([0.0, 250.0, 700.0])
    with torch.no_grad(), loaded.second_time.applied(gap):
        migrated = loaded.net(x, timesteps).sample
    with torch.no_grad():
        original = old_net(x, timesteps, class_labels=gap).sample
    assert_close(migrated, original, what="format-2 network function after migration")
    assert getattr(loaded.net.config, "class_embed_type", None) is None
