"""Students of class-conditional architectures: DiT label consistency across blocks, label dropout under the stage's
control, the DiT's second time input, and the null class of UNet students."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel

from pipeline.teacher import Teacher
from tests.helpers import assert_close, tiny_unet
from trainer.label_dropout import LabelDropout
from trainer.student import FlowMapStudent

NUM_CLASSES = 10


def tiny_dit_teacher(num_layers: int = 3) -> Teacher:
    """A class-conditional DiT (learned sigma, 10 classes + the null class) on 4×8×8 latents, several blocks."""
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=num_layers, sample_size=8, patch_size=2, norm_num_groups=4,
                                num_embeds_ada_norm=NUM_CLASSES)
    return Teacher(dit, DDPMScheduler(beta_schedule="linear"))


def record_block_labels(net: torch.nn.Module) -> tuple[list[torch.Tensor], list]:
    """Record the class ids every label-embedding table of `net` looks up (one entry per lookup)."""
    from diffusers.models.embeddings import LabelEmbedding

    seen: list[torch.Tensor] = []
    handles = [module.embedding_table.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
               for module in net.modules() if isinstance(module, LabelEmbedding)]
    return seen, handles


def test_every_block_of_a_dit_student_sees_the_same_labels_in_train_mode():
    teacher = tiny_dit_teacher(num_layers=3)
    labels = torch.arange(64) % NUM_CLASSES
    x, sigma = torch.randn(64, 4, 8, 8), torch.full((64,), 2.0, dtype=torch.float64)

    raw = copy.deepcopy(teacher.model).train()  # diffusers' own train mode: each block drops labels by itself
    seen, _ = record_block_labels(raw)
    torch.manual_seed(1)
    raw(x, torch.full((64,), 500.0), class_labels=labels)
    assert len(seen) == 3 + 1 and any(not torch.equal(ids, labels) for ids in seen)  # 3 blocks + the final layer

    student = FlowMapStudent.from_teacher(teacher).train()
    seen, _ = record_block_labels(student.net)
    student("cm", x, sigma, labels)
    assert len(seen) == 4 and all(torch.equal(ids, labels) for ids in seen)

    seen.clear()
    torch.manual_seed(2)
    LabelDropout(lambda model, batch, step: model("cm", x, sigma, batch["labels"]).sum(), 0.5, student.null_class)(
        student, {"labels": labels}, 0)
    dropped = seen[0] == NUM_CLASSES
    assert 0 < int(dropped.sum()) < 64 and all(torch.equal(ids, seen[0]) for ids in seen)
    assert torch.equal(seen[0][~dropped], labels[~dropped])


def test_dit_mf_student_starts_as_the_teachers_velocity_for_every_r_and_learns_r():
    teacher = tiny_dit_teacher(num_layers=2)
    student = FlowMapStudent.from_teacher(teacher, second_time_input=True, parameterization="teacher")
    tau, labels = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64), torch.tensor([1, 4, NUM_CLASSES])  # + null
    z = torch.randn(3, 4, 8, 8)
    x_edm = z / (1 - tau.float()).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        teacher_velocity = (z - teacher.denoise(x_edm, (tau / (1 - tau)).numpy(), labels=labels[:2].tolist() + [0])
                            ) / tau.float().reshape(-1, 1, 1, 1)
        for r in (None, tau * 0.0, tau * 0.5):
            u = student.velocity(z, t=tau, r=r, labels=labels)
            assert_close(u[:2], teacher_velocity[:2], ulps=256, magnitude=float(teacher_velocity.abs().max()),
                         what=f"DiT u at init, r={r}")
    assert dict(student.net.config) == dict(teacher.model.config)
    student.velocity(z, t=tau, r=tau * 0.3, labels=labels).pow(2).sum().backward()
    assert student.second_time.embedding.linear_2.weight.grad.abs().sum() > 0  # (t − r) is trainable
    torch.nn.init.normal_(student.second_time.embedding.linear_2.weight, std=0.1)
    with torch.no_grad():
        assert not torch.allclose(student.velocity(z, t=tau, r=tau * 0.0, labels=labels),
                                  student.velocity(z, t=tau, labels=labels))


def test_a_unet_student_gets_a_null_class_row_that_survives_export(tmp_path):
    from trainer.student_init import check_student_fits

    teacher = Teacher(tiny_unet(num_class_embeds=3), DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    student = FlowMapStudent.from_teacher(teacher, second_time_input=True)
    assert student.null_class is None
    assert student.add_null_class() == 3 and student.null_class == 3
    table = student.net.class_embedding.weight.detach()
    assert torch.equal(table[3], table[:3].mean(dim=0)) and torch.equal(table[:3], teacher.model.class_embedding.weight)
    z, tau = torch.randn(2, 1, 8, 8), torch.tensor([0.4, 0.6], dtype=torch.float64)
    with torch.no_grad():
        student.velocity(z, t=tau, labels=torch.tensor([0, 3]))  # the null class is a valid label now
    loaded = FlowMapStudent.from_pretrained(student.save_pretrained(tmp_path / "export"))
    assert loaded.null_class == 3 and loaded.num_classes == 3
    check_student_fits(loaded, method="meanflow", sample_shape=None, teacher=teacher)  # the extra row is allowed
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\) \(or the null class 3\)"):
        loaded.velocity(z, t=tau, labels=torch.tensor([0, 4]))


def test_a_deep_copy_of_an_mf_student_uses_its_own_second_time_input():
    """The loop's EMA is a deep copy: its hooks must add the copy's (t − r) embedding, not the trained model's."""
    student = FlowMapStudent.from_teacher(Teacher(tiny_unet(), DDPMScheduler()), second_time_input=True)
    copied = copy.deepcopy(student)
    torch.nn.init.normal_(copied.second_time.embedding.linear_2.weight, std=0.5)
    z, t, r = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.6]), torch.tensor([0.1, 0.2])
    with torch.no_grad():
        assert torch.equal(student.velocity(z, t=t, r=r), student.velocity(z, t=t))  # still zero in the original
        assert not torch.equal(copied.velocity(z, t=t, r=r), copied.velocity(z, t=t))
