"""Online trajectories for mid-training: the teacher's PF-ODE solved afresh at every step, as the CMT authors train.

The authors' code (sony/cmt, training/loss.py `DPMSolverLoss`) re-solves the teacher inside every training step: B/K
fresh prior noises, the K-step DPM-Solver++ with the frozen teacher under no_grad, and all K points of those
trajectories in the batch. `OnlineTrajectories` does the same with this project's solver and conventions, so its
samples are the ones `pipeline/generate.py` would write into a (float32) store and `trainer.data.stream` would
stream, up to the float32 rounding of a solve batched differently:

- Micro-batch b of rank r (of W ranks) solves T = B / M trajectories, M = the samples one trajectory gives: form cm,
  its K non-final points, each regressing onto point K; form mf, every pair of points (t > r), or
  `pairs_per_trajectory` of them drawn per trajectory. Batch row t·M + m is sample m of trajectory t.
- Trajectory n = (b·W + r)·T + t starts from `prior_noise([seed_base + n])`: the prior noise of trajectory n of
  `pipeline/generate.py --seed <seed_base>`. prior_noise seeds a torch CPU generator, which keeps the low 32 bits of a
  seed only, so the 2³² noise seeds are split into 64 ranges of 2²⁶ (67 M trajectories): seed_base = loop seed · 2²⁶,
  loop seeds 0–63. Runs of different seeds never share a trajectory, every rank solves its own, and no trajectory is
  solved twice in a run (fresh noise every step; a run that would need more than 2²⁶ trajectories stops with an error).
- The points come from `pipeline.solvers.solve` (the solver, grid and σ range that generation uses; the teacher runs
  under no_grad) and become samples through the stream's own templates (`trainer.data.batch_schema`: `sample_template`,
  `batch_from_template`): the same keys, views and float64 → float32 conversion as a float32 store.
  Class-conditional teachers get generation's labels (`pipeline.shard_worker.labels_for`) and guidance.
- Everything is a pure function of (seed_base, b, r), so the position is the number of micro-batches made, and resume
  continues with bitwise the batches the uninterrupted run would have made. The source counts the teacher's network
  evaluations and the seconds spent solving (both checkpointed with the position).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from pipeline.solver_names import SCHEDULER_GRID, SCHEDULER_GRID_ONLY
from trainer.config import ConfigError
from trainer.data.batch_schema import batch_from_template, sample_template

__all__ = [
    "ONLINE_STATE_FORMAT", "SEED_STRIDE", "OnlineOptions", "OnlineSourceError", "OnlineTrajectories",
    "open_online_source",
]

ONLINE_STATE_FORMAT = "cmt-online-trajectories/1"
SEED_STRIDE = 2**26  # seed_base = loop seed · SEED_STRIDE: one run's trajectories never reach the next seed's
NUM_SEEDS = 2**32 // SEED_STRIDE  # torch CPU generators keep 32 bits of a seed: loop seeds 0..63 have disjoint ranges
_SUBSET_STREAM = 2  # tag of the random stream that draws pair subsets (after the stream's 0 and 1)


class OnlineSourceError(ConfigError):
    """Online settings that cannot make batches (solver, grid, batch size, pairs); names the key to change."""


@dataclass(frozen=True, kw_only=True)
class OnlineOptions:
    """data=online: whose PF-ODE is solved at every step and how (the arguments of pipeline.solvers.solve)."""

    teacher: str | None = None  # the teacher solved online; None: the student's own (`teacher`)
    allow_other_teacher: bool = False  # train on another teacher's trajectories than the student's (normally refused)
    solver: str = "dpmpp-3m"
    steps: int = 16  # K solver steps per trajectory
    grid: str = "logsnr"
    sigma_max: float | None = None
    sigma_min: float | None = None
    labels: str | None = None  # class-conditional teachers: "uniform" (default) or class ids "3,7" (generate --labels)
    guidance: float | None = None  # classifier-free guidance scale (generate --guidance)
    pairs_per_trajectory: int | None = None  # form mf: pairs drawn per trajectory (None: all of them)

    def __post_init__(self) -> None:
        """Reject counts that cannot work (solver and grid are checked against the teacher, as generation does)."""
        if self.steps < 1:
            raise ConfigError(f"online.steps must be >= 1 (K solver steps per trajectory), got {self.steps}")
        if self.pairs_per_trajectory is not None and self.pairs_per_trajectory < 1:
            raise ConfigError(
                f"online.pairs_per_trajectory must be >= 1 or none (all), got {self.pairs_per_trajectory}")
        if self.solver in SCHEDULER_GRID_ONLY and self.grid != SCHEDULER_GRID:
            raise ConfigError(  # generation refuses the same pair of flags (pipeline/generate_options.py)
                f"online.solver={self.solver} cannot run online.grid={self.grid}: it steps only between the teacher's "
                f"own timesteps (online.grid={SCHEDULER_GRID}). Set online.grid={SCHEDULER_GRID}, or keep "
                f"online.grid={self.grid} with online.solver=euler (the same first-order method on any grid) or "
                "online.solver=dpmpp-3m")


class OnlineTrajectories:
    """Endless, resumable batches of freshly solved teacher trajectories for one rank (see the module docstring)."""

    def __init__(self, teacher: Any, options: OnlineOptions, *, mode: Literal["cm", "mf"], batch_per_process: int,
                 seed: int, rank: int, world_size: int) -> None:
        """Plan the batch layout for `teacher` (a pipeline.teacher.Teacher); raises OnlineSourceError naming the fix."""
        from pipeline.generate import forward_evaluations_per_trajectory
        from pipeline.solvers import SolverError, time_grid
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if mode == "cm" and options.pairs_per_trajectory is not None:
            raise OnlineSourceError("online.pairs_per_trajectory is for form=mf; form=cm trains on all K points")
        try:
            self.alpha, self.sigma = time_grid(teacher, options.steps, options.solver, options.grid,
                                               sigma_max=options.sigma_max, sigma_min=options.sigma_min)
        except SolverError as error:
            raise OnlineSourceError(str(error)) from error
        self._check_conditioning(teacher, options)
        self.teacher, self.options, self.mode = teacher, options, mode
        self.batch_per_process, self.rank, self.world_size = batch_per_process, rank, world_size
        if not 0 <= seed < NUM_SEEDS:
            raise OnlineSourceError(
                f"data=online needs 0 <= loop.seed < {NUM_SEEDS}, got {seed}: each seed owns 2^26 of the 2^32 "
                "prior-noise seeds (torch generators keep 32 bits), so larger seeds would repeat another seed's "
                "trajectories")
        self.seed_base = int(seed) * SEED_STRIDE
        self.template = sample_template(mode, self.alpha, self.sigma)
        available = len(self.template["point_a"])
        if available == 0:
            raise OnlineSourceError(
                f"{options.solver} K={options.steps} on grid {options.grid} gives no {mode!r} sample (σ = "
                f"{self.sigma.tolist()}): use more online.steps or another online.grid")
        drawn = options.pairs_per_trajectory or available
        if drawn > available:
            raise OnlineSourceError(
                f"online.pairs_per_trajectory={drawn} but a trajectory of K={options.steps} offers only {available} "
                f"pairs: set it <= {available} or none (all)")
        self.samples_per_trajectory = drawn
        if batch_per_process % drawn:
            what = "points" if mode == "cm" else "pairs"
            nearest = sorted({max(drawn, batch_per_process // drawn * drawn), (batch_per_process // drawn + 1) * drawn})
            raise OnlineSourceError(
                f"data=online trains on {drawn} {what} of each fresh trajectory (the authors' batch/K trajectories "
                f"× all K points), so batch_per_process={batch_per_process} must be a multiple of {drawn}: use "
                + " or ".join(f"batch_per_process={size}" for size in nearest)
                + (", or set online.pairs_per_trajectory" if mode == "mf" else ""))
        self.trajectories_per_batch = batch_per_process // drawn
        self.forwards_per_trajectory = forward_evaluations_per_trajectory(options.solver, options.steps,
                                                                          options.guidance)
        self.batches_made = 0
        self.solve_seconds = 0.0
        self.first_batch_this_run: int | None = None

    @staticmethod
    def _check_conditioning(teacher: Any, options: OnlineOptions) -> None:
        """Labels and guidance only for class-conditional teachers; class ids inside the teacher's classes."""
        if teacher.num_classes is None:
            for name in ("labels", "guidance"):
                if getattr(options, name) is not None:
                    raise OnlineSourceError(f"online.{name} was given but the teacher is unconditional: drop it")
            return
        classes = [] if options.labels in (None, "uniform") else options.labels.split(",")
        if any(not text.strip().isdigit() or int(text) >= teacher.num_classes for text in classes):
            raise OnlineSourceError(
                f"online.labels={options.labels!r}: write 'uniform' or class ids in [0, {teacher.num_classes}) "
                "separated by commas")

    # batches -------------------------------------------------------------------------------------------------
    def trajectory_indices(self, batch: int) -> np.ndarray:
        """Indices n [T] of the trajectories of micro-batch `batch` on this rank (their seeds are seed_base + n)."""
        first = (batch * self.world_size + self.rank) * self.trajectories_per_batch
        if first + self.trajectories_per_batch > SEED_STRIDE:
            raise OnlineSourceError(
                f"this run has solved all 2^26 trajectories of loop.seed {self.seed_base // SEED_STRIDE}; fresh noise "
                "would repeat another seed's: train on fewer steps per seed, or on a trajectory store (data=stores)")
        return np.arange(first, first + self.trajectories_per_batch, dtype=np.int64)

    def make_batch(self, batch: int) -> dict[str, torch.Tensor]:
        """Micro-batch `batch` of this rank: solve its T trajectories and take every (or the drawn) sample of each."""
        from pipeline.shard_worker import labels_for
        from pipeline.solvers import solve
        options, teacher = self.options, self.teacher
        indices = self.trajectory_indices(batch)
        labels = labels_for(indices, options.labels, teacher.num_classes, self.seed_base)
        trajectory = solve(teacher, [self.seed_base + int(n) for n in indices], steps=options.steps,
                           solver=options.solver, grid=options.grid, sigma_max=options.sigma_max,
                           sigma_min=options.sigma_min, labels=None if labels is None else torch.as_tensor(labels),
                           guidance_scale=options.guidance)
        native = trajectory.points.numpy()  # [T, K+1, *S] float32, the teacher's own state space
        items, rows = self._items(batch)  # [B], [B]
        out = batch_from_template(self.mode, self.template, native, rows, items)
        if labels is not None:
            out["labels"] = torch.from_numpy(labels[rows])
        return out

    def _items(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(template sample, trajectory row) of every batch row: all samples of each trajectory, or a drawn subset."""
        available, drawn = len(self.template["point_a"]), self.samples_per_trajectory
        trajectories = self.trajectories_per_batch
        if drawn == available:
            items = np.tile(np.arange(available), trajectories)  # [T·M]
        else:
            rng = np.random.default_rng([self.seed_base, batch, self.rank, _SUBSET_STREAM])
            items = np.argsort(rng.random((trajectories, available)), axis=1)[:, :drawn].reshape(-1)  # [T·m]
        return items, np.repeat(np.arange(trajectories), drawn)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield micro-batches forever from the current position, advancing it as each batch is handed out."""
        if self.first_batch_this_run is None:
            self.first_batch_this_run = self.batches_made
        while True:
            started = time.perf_counter()
            batch = self.make_batch(self.batches_made)
            self.solve_seconds += time.perf_counter() - started
            self.batches_made += 1
            yield batch

    # accounting and checkpointing ----------------------------------------------------------------------------
    @property
    def teacher_forward_samples(self) -> int:
        """Teacher network evaluations (one per sample per call) this rank spent on the batches made so far."""
        return self.batches_made * self.trajectories_per_batch * self.forwards_per_trajectory

    def report(self) -> dict[str, Any]:
        """What this rank solved: seed convention, counts, the seeds of its first and last batch of this process."""
        first = self.first_batch_this_run if self.first_batch_this_run is not None else self.batches_made
        seeds = {}
        if self.batches_made > first:
            for name, batch in (("first_batch_seeds", first), ("last_batch_seeds", self.batches_made - 1)):
                indices = self.trajectory_indices(batch)
                seeds[name] = [self.seed_base + int(indices[0]), self.seed_base + int(indices[-1]) + 1]
        return {
            "seed_base": self.seed_base,
            "trajectory_seed": "seed_base + (batch·world_size + rank)·trajectories_per_batch + t",
            "solver": f"{self.options.solver} K={self.options.steps} grid={self.options.grid}",
            "trajectories_per_batch": self.trajectories_per_batch,
            "samples_per_trajectory": self.samples_per_trajectory,
            "batches_made": self.batches_made,
            "teacher_forward_samples": self.teacher_forward_samples,
            "solve_seconds": self.solve_seconds,
            **seeds,
        }

    def _signature(self) -> dict[str, Any]:
        """Everything besides the position that decides the batch sequence."""
        options = self.options
        return {
            "teacher": self.teacher.fingerprint, "mode": self.mode, "solver": options.solver, "steps": options.steps,
            "grid": options.grid, "sigma_max": options.sigma_max, "sigma_min": options.sigma_min,
            "labels": options.labels, "guidance": options.guidance, "samples_per_trajectory":
            self.samples_per_trajectory, "batch_per_process": self.batch_per_process, "seed_base": self.seed_base,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position (micro-batches made, the same on every rank), the settings it depends on, and the counters."""
        return {"format": ONLINE_STATE_FORMAT, "batches_made": self.batches_made, "solve_seconds": self.solve_seconds,
                "signature": self._signature()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position; a checkpoint made with other data settings is refused."""
        if state.get("format") != ONLINE_STATE_FORMAT:
            raise OnlineSourceError(
                f"the checkpoint's data source is not data=online (format {state.get('format')!r}): resume with the "
                "data settings it was made with, or use a new loop.output_dir")
        saved, current = state["signature"], self._signature()
        differences = [f"{name}: checkpoint {saved.get(name)!r}, now {value!r}" for name, value in current.items()
                       if saved.get(name) != value]
        if differences:
            raise OnlineSourceError(
                "the checkpoint's online trajectories were made with other settings (" + "; ".join(differences) +
                "); resume with the same teacher, online.* settings, batch size, seed and number of processes, or "
                "use a new loop.output_dir")
        self.batches_made = int(state["batches_made"])
        self.solve_seconds = float(state["solve_seconds"])


def open_online_source(options: OnlineOptions, student_teacher: Any, *, student_teacher_source: str,
                       mode: Literal["cm", "mf"], batch_per_process: int, seed: int, rank: int,
                       world_size: int) -> OnlineTrajectories:
    """This rank's data=online batches; the teacher solved is the student's own unless online.teacher names another.

    Another teacher (another fingerprint) is refused unless online.allow_other_teacher; a solver/grid pair generation
    refuses is refused in online.* keys (OnlineOptions), one the teacher cannot run raises pipeline.solvers' error.
    """
    teacher = student_teacher
    if options.teacher is not None:
        from pipeline.teacher import load_teacher

        teacher = load_teacher(options.teacher, device=student_teacher.device)
        if tuple(teacher.sample_shape) != tuple(student_teacher.sample_shape):
            raise OnlineSourceError(
                f"online.teacher {options.teacher} makes samples of shape {list(teacher.sample_shape)} but the "
                f"student's are {list(student_teacher.sample_shape)}: solve a teacher of the same data/resolution")
        if teacher.fingerprint != student_teacher.fingerprint and not options.allow_other_teacher:
            raise OnlineSourceError(
                f"online.teacher {options.teacher} (fingerprint {teacher.fingerprint[:12]}…) is not the teacher the "
                f"student is built from (teacher={student_teacher_source}, {student_teacher.fingerprint[:12]}…): CMT "
                "regresses onto its own teacher's ODE. Drop online.teacher, or pass online.allow_other_teacher=true to "
                "train on the other teacher's trajectories")
    return OnlineTrajectories(teacher, options, mode=mode, batch_per_process=batch_per_process, seed=seed, rank=rank,
                              world_size=world_size)
