"""A post-training student from its `--init`, and the checks that it fits the run (trainer/post.py).

Inits: `cmt:<dir>` (a mid-training export, `FlowMapStudent.from_pretrained`, read with the parameterisation it records;
a mid-training run directory is accepted for its export/), `teacher` (the diffusion model itself: the teacher's
weights AND its own c_skip/c_out, so f is its x0 prediction and u at r = t its velocity), `random` (the teacher's
architecture, fresh weights, read the way "auto" picks in `trainer.parameterization`). MeanFlow's student carries the
second time input (`trainer.second_time`).

The checks refuse a student whose sample shape differs from the data's, whose architecture or time convention differs
from the teacher's, or that lacks the second time input MeanFlow needs; each error names the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import ConfigError
from trainer.student_export import student_export_dir

__all__ = ["CMT_PREFIX", "InitError", "check_student_fits", "cmt_export_dir", "student_from_init"]

CMT_PREFIX = "cmt:"


class InitError(ConfigError):
    """A student init that does not fit the run (wrong architecture, time convention, form); names the fix."""


def cmt_export_dir(init: str) -> Path:
    """The student export named by `cmt:<dir>` (a mid-training run dir is accepted for its export/)."""
    directory = Path(init[len(CMT_PREFIX) :].strip()).expanduser()
    return student_export_dir(directory) or directory


def check_student_fits(
    student: Any, *, method: str, sample_shape: Sequence[int] | None, teacher: Any = None, source: str = "the student"
) -> None:
    """Refuse a student whose architecture / time convention differs from the teacher's or the data's, or one without
    the second time input MeanFlow needs; raises InitError naming the fix."""
    if sample_shape is not None and tuple(student.sample_shape) != tuple(sample_shape):
        raise InitError(
            f"{source} is built for samples of shape {list(student.sample_shape)} but the data holds "
            f"{list(sample_shape)}: another architecture. Post-train the export made from this data's teacher "
            "(trainer/mid.py on its stores), or pick the matching --data"
        )
    if method == "meanflow" and not student.second_time_input:
        raise InitError(
            f"MeanFlow needs a student with a second time input (u_θ(z, r, t)); {source} has none (a CM-form export). "
            "Mid-train with form=mf (trainer/mid.py form=mf), use --init teacher / random (built with the second "
            "time input), or post-train this export with --method ect / ecd"
        )
    if teacher is None:
        return
    # a student may carry a null-class row its teacher lacks (trainer.student.FlowMapStudent.add_null_class)
    ignored = {"num_class_embeds"} if student.num_classes == teacher.num_classes else set()
    student_config = {k: v for k, v in dict(student.net.config).items() if not k.startswith("_") and k not in ignored}
    teacher_config = {k: v for k, v in dict(teacher.model.config).items() if not k.startswith("_") and k not in ignored}
    differing = sorted(key for key in student_config.keys() | teacher_config.keys()
                       if _config_value(student_config.get(key)) != _config_value(teacher_config.get(key)))
    if type(student.net).__name__ != type(teacher.model).__name__ or differing:
        details = ", ".join(f"{key}: {student_config.get(key)!r} vs {teacher_config.get(key)!r}"
                            for key in differing[:4])
        raise InitError(
            f"{source} has another architecture than the teacher {teacher.model.__class__.__name__} "
            f"({type(student.net).__name__}; {details or 'class differs'}): pass the export mid-trained from this "
            "teacher, or set teacher=<the teacher it was made from>"
        )
    same_schedule = (
        student.schedule.family == teacher.schedule.family
        and student.schedule.num_train_timesteps == teacher.schedule.num_train_timesteps
        and (student.schedule.log_sigma_table is None) == (teacher.schedule.log_sigma_table is None)
        and (student.schedule.log_sigma_table is None
             or np.allclose(student.schedule.log_sigma_table, teacher.schedule.log_sigma_table, rtol=0, atol=1e-9))
    )
    if not same_schedule or student.prediction_type != teacher.prediction_type:
        raise InitError(
            f"{source} uses another time convention than the teacher (schedule {student.schedule.family}, "
            f"T={student.schedule.num_train_timesteps}, prediction {student.prediction_type} vs "
            f"{teacher.schedule.family}, T={teacher.schedule.num_train_timesteps}, prediction "
            f"{teacher.prediction_type}): its σ̃ ↦ timestep map would be wrong. Pass the export mid-trained from "
            "this teacher, or set teacher=<the teacher it was made from>"
        )


def _config_value(value: Any) -> Any:
    """Config values compared as JSON-like data (tuples and lists alike)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def student_from_init(init: str, *, method: str, teacher: Any, seed: int, device: torch.device) -> Any:
    """The FlowMapStudent of `init` (cmt export, teacher weights or random), MF-capable for method "meanflow"."""
    from trainer.student import FlowMapStudent, StudentLoadError

    if init.startswith(CMT_PREFIX):
        directory = cmt_export_dir(init)
        try:
            student = FlowMapStudent.from_pretrained(directory, device=device)
        except StudentLoadError as error:
            raise InitError(f"--init {init}: {error}") from error
        return student.train()
    # init=teacher is the diffusion model itself (its own c_skip/c_out: the student IS its denoiser); a random init
    # takes the well-conditioned reading "auto" picks (trainer.parameterization)
    try:
        student = FlowMapStudent.from_teacher(teacher, second_time_input=method == "meanflow", init=init, seed=seed,
                                              parameterization="teacher" if init == "teacher" else "auto")
    except StudentLoadError as error:
        raise InitError(f"--init {init} --method {method}: {error}") from error
    return student.to(device).train()
