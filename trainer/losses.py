"""Pure per-sample losses for mid-training (CMT) and post-training (ECT / ECD, MeanFlow).

Every loss returns the UNREDUCED per-sample loss, shape [B]; the caller averages (or weights) over the
batch. Schedules (t, r, Δt, q) arrive as arguments; nothing here keeps state between calls.

Conventions shared by every function in this module:

- Squared norms are SUMS over all non-batch elements, ‖a − b‖² = Σ_pixels (a − b)², as in the ECT/iCT and
  MeanFlow reference code. A loss value therefore grows with the number of pixels; the pseudo-Huber
  constant of iCT, c = 0.00054·√d, is scaled for exactly this sum (see `ict_pseudo_huber_c`).
- Times come per sample: a tensor of shape [B] (or [B, 1, ..., 1], or one value for the whole batch).
  Time differences (t − r, t_i − t_j) are taken in the times' own dtype (keep float64 times from the
  store in float64) before they are cast to the data dtype.
- Students of Ψ_{t→0} (CMT's CM form, ECT, ECD) work in the EDM view: x̃ = x0 + σ̃·ε, t = σ̃ ≥ 0.
  Students of Ψ_{t→s} (CMT's MF form, MeanFlow) work in the flow-matching view: z = (1 − τ)·x0 + τ·ε,
  τ ∈ [0, 1], velocity v = ε − x0. Converting stored states into either view is the job of
  `pipeline/time_convention.py`; the losses never convert.
- Times are keyword-only, start time first: `t=` (or `t_i=`) then `r=` (or `t_j=`), r ≤ t. A velocity function
  `u_fn(z, *, t, r)` takes them the same way (`FlowMapStudent.velocity`'s signature); MeanFlow's paper writes the
  same average velocity u(z, r, t).

The method glue around these functions (time sampling, pairs, dropout masks, attention kernels) lives in
`trainer/methods/`.

Papers: CMT = Hu et al., "Consistency Mid-Training", arXiv 2509.24526; ECT = Geng et al., "Consistency
models made easy", arXiv 2406.14548; iCT = Song & Dhariwal, arXiv 2310.14189; MeanFlow = Geng et al.,
"Mean Flows for one-step generative modeling", arXiv 2505.13447; LPIPS = Zhang et al., arXiv 1801.03924.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Distance = Callable[[Tensor, Tensor], Tensor]
TimeLike = Tensor | float

ICT_PSEUDO_HUBER_SCALE = 0.00054
MEANFLOW_ADAPTIVE_C = 1e-3
DISTANCE_NAMES = ("squared_l2", "pseudo_huber", "lpips")


# ---------------------------------------------------------------------------------------------
# Shape and time helpers


def _check_same_shape(a: Tensor, b: Tensor, names: str) -> None:
    """Raise a ValueError naming both tensors when their shapes differ."""
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 1:
        raise ValueError(f"{names} need a leading batch dimension, got 0-d tensors")


def _sum_squares(diff: Tensor) -> Tensor:
    """Per-sample sum of squares over every non-batch element: [B, ...] → [B]."""
    return diff.pow(2).flatten(1).sum(dim=1) if diff.dim() > 1 else diff.pow(2)  # [B]


def _per_sample(times: TimeLike, batch: int, name: str, like: Tensor) -> Tensor:
    """Turn a scalar, [B] or [B, 1, ..., 1] time into a [B] tensor on `like`'s device (dtype kept if a tensor)."""
    if not isinstance(times, Tensor):
        times = torch.tensor(times, dtype=torch.float64)  # Python floats keep double precision for t − r
    times = times.to(like.device)
    if not times.is_floating_point():
        times = times.to(like.dtype)
    if times.numel() == 1:
        return times.reshape(1).expand(batch)  # [B]
    if times.numel() != batch:
        raise ValueError(f"{name} must hold one time per sample ({batch}) or one for the batch, "
                         f"got shape {tuple(times.shape)}")
    return times.reshape(batch)  # [B]


def column(values: Tensor, like: Tensor) -> Tensor:
    """View per-sample values [B] as [B, 1, ..., 1] in `like`'s dtype so they broadcast against `like`."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))  # [B, 1, ..., 1]


# ---------------------------------------------------------------------------------------------
# Distances d(a, b) → [B]


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distance per sample, d(a, b) = Σ (a − b)² over all non-batch elements (CMT's "MSE")."""
    _check_same_shape(a, b, "squared_l2 inputs")
    return _sum_squares(a - b)  # [B]


def ict_pseudo_huber_c(num_elements: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054·√d for d elements per sample (c ≈ 0.03 for CIFAR-10's 3072)."""
    if num_elements < 1:
        raise ValueError(f"num_elements must be positive, got {num_elements}")
    return ICT_PSEUDO_HUBER_SCALE * math.sqrt(num_elements)


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """Pseudo-Huber distance √(‖a − b‖² + c²) − c (iCT's metric, used by ECT); c=None takes 0.00054·√d."""
    _check_same_shape(a, b, "pseudo_huber inputs")
    if c is None:
        c = ict_pseudo_huber_c(a[0].numel())
    if c < 0:
        raise ValueError(f"pseudo-Huber c must be >= 0 (0 gives the plain L2 norm), got {c}")
    return torch.sqrt(_sum_squares(a - b) + c * c) - c  # [B]


# LPIPS-VGG (Zhang et al. 2018): VGG-16 conv trunk, features tapped after relu1_2, relu2_2, relu3_3, relu4_3
# and relu5_3 (indices into torchvision's `vgg16().features`), unit-normalised over channels, squared
# differences weighted per channel by the learned linear layers, averaged over space, summed over taps.
_VGG16_CONV_CHANNELS = ((3, 64), (64, 64), "pool", (64, 128), (128, 128), "pool", (128, 256), (256, 256),
                        (256, 256), "pool", (256, 512), (512, 512), (512, 512), "pool", (512, 512),
                        (512, 512), (512, 512))
_LPIPS_TAP_INDICES = (3, 8, 15, 22, 29)
_LPIPS_TAP_CHANNELS = (64, 128, 256, 512, 512)
_LPIPS_INPUT_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_INPUT_SCALE = (0.458, 0.448, 0.450)
_LPIPS_NORMALIZE_EPS = 1e-10
_LPIPS_MIN_SIDE = 16
LPIPS_WEIGHTS_HELP = (
    "LPIPS needs one LOCAL weights file (nothing is downloaded) holding the ImageNet VGG-16 trunk under "
    "torchvision's key names ('features.0.weight', 'features.0.bias', ..., 'features.28.bias') and the "
    "LPIPS v0.1 linear layers under the `lpips` package's key names ('lin0.model.1.weight', ..., "
    "'lin4.model.1.weight'). Build it once on a machine with torchvision and the `lpips` package:\n"
    "    import torch, torchvision, lpips, os\n"
    "    from safetensors.torch import save_file\n"
    "    trunk = torchvision.models.vgg16(weights='IMAGENET1K_V1').features.state_dict()\n"
    "    lins = torch.load(os.path.join(os.path.dirname(lpips.__file__), 'weights/v0.1/vgg.pth'), map_location='cpu')\n"
    "    save_file({**{f'features.{k}': v for k, v in trunk.items()}, **lins}, 'lpips_vgg.safetensors')\n"
    "then pass that file's path (a .safetensors file, or a .pt/.pth state dict with the same keys)."
)


def _vgg16_trunk() -> nn.Sequential:
    """VGG-16 conv trunk up to relu5_3, laid out so torchvision's `features.<i>` keys load unchanged."""
    layers: list[nn.Module] = []
    for entry in _VGG16_CONV_CHANNELS:
        if entry == "pool":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(entry[0], entry[1], kernel_size=3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def _load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file, or a plain tensor state dict via torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"LPIPS weights file {path} does not hold a state dict (got {type(state).__name__}).\n"
                         f"{LPIPS_WEIGHTS_HELP}")
    return state


class LPIPSDistance(nn.Module):
    """LPIPS-VGG distance (Zhang et al. 2018, eq. 1) from a local weights file; inputs in [-1, 1], returns [B].

    Implemented here rather than through the `lpips` package: that package imports torchvision at import
    time and fetches the VGG trunk from the internet, and torchvision from PyPI does not import beside this
    project's torch build. The computation follows LPIPS v0.1 (input shift/scale, channel unit-normalisation,
    linear layers, spatial mean, sum over the five taps). Single-channel images are repeated to RGB.
    `resize_to` bilinearly resizes both inputs to a square side first (None, the default: the images' own
    resolution, as the CMT authors use it; iCT/ECT resize CIFAR-10 to 224; VGG's five taps need a side of at least
    16). The network is frozen; gradients flow to the inputs.
    """

    def __init__(self, weights_path: str | Path | None, *, resize_to: int | None = None):
        super().__init__()
        if weights_path is None or str(weights_path) == "":
            raise ValueError(f"LPIPSDistance needs `weights_path`, got none.\n{LPIPS_WEIGHTS_HELP}")
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ValueError(f"LPIPS weights file not found: {path}\n{LPIPS_WEIGHTS_HELP}")
        if resize_to is not None and resize_to < _LPIPS_MIN_SIDE:
            raise ValueError(f"resize_to must be >= {_LPIPS_MIN_SIDE} (VGG-16's deepest LPIPS tap), got {resize_to}")
        self.resize_to = resize_to
        self.features = _vgg16_trunk()
        self.lins = nn.ModuleList(nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in _LPIPS_TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(_LPIPS_INPUT_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_INPUT_SCALE).view(1, 3, 1, 1), persistent=False)
        self._load(path)
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: Path) -> None:
        """Copy the trunk and linear-layer weights from the file, naming any missing or misshapen key."""
        state = _load_state_dict_file(path)
        wanted = {f"features.{name}": tensor for name, tensor in self.features.state_dict().items()}
        wanted |= {f"lin{k}.model.1.weight": lin.weight for k, lin in enumerate(self.lins)}
        missing = sorted(key for key in wanted if key not in state)
        if missing:
            raise ValueError(f"LPIPS weights file {path} lacks {len(missing)} key(s), e.g. {missing[:4]}.\n"
                             f"{LPIPS_WEIGHTS_HELP}")
        wrong = [f"{key}: file {tuple(state[key].shape)} vs expected {tuple(ref.shape)}"
                 for key, ref in wanted.items() if tuple(state[key].shape) != tuple(ref.shape)]
        if wrong:
            raise ValueError(f"LPIPS weights file {path} has tensors of the wrong shape: {wrong[:4]}.\n{LPIPS_WEIGHTS_HELP}")
        self.features.load_state_dict({name: state[f"features.{name}"] for name in self.features.state_dict()})
        for k, lin in enumerate(self.lins):
            lin.weight.data.copy_(state[f"lin{k}.model.1.weight"])

    def _taps(self, images: Tensor) -> list[Tensor]:
        """VGG-16 activations at the five LPIPS taps, each unit-normalised over channels."""
        taps = []
        hidden = (images - self.shift) / self.scale  # [B, 3, H, W]
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in _LPIPS_TAP_INDICES:
                norm = hidden.pow(2).sum(dim=1, keepdim=True).sqrt()  # [B, 1, h, w]
                taps.append(hidden / (norm + _LPIPS_NORMALIZE_EPS))  # [B, C_tap, h, w]
        return taps

    def _prepare(self, images: Tensor) -> Tensor:
        """Check shape, repeat grey images to RGB and resize; [B, C, H, W] → [B, 3, H', W']."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes images [B, 1 or 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # [B, 3, H, W]
        if self.resize_to is not None and tuple(images.shape[-2:]) != (self.resize_to, self.resize_to):
            images = F.interpolate(images, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        if min(images.shape[-2:]) < _LPIPS_MIN_SIDE:
            raise ValueError(f"LPIPS needs images of side >= {_LPIPS_MIN_SIDE}, got {tuple(images.shape[-2:])}; "
                             f"pass resize_to (lpips_resize_to=... in the stage config; e.g. 224, as iCT/ECT do "
                             f"for CIFAR-10)")
        return images

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS(a, b) per sample: Σ_taps mean_{h,w} Σ_c w_c·(â − b̂)²; [B, C, H, W] × 2 → [B]."""
        _check_same_shape(a, b, "LPIPS inputs")
        batch = a.shape[0]
        taps = self._taps(torch.cat([self._prepare(a), self._prepare(b)]))  # each [2B, C_tap, h, w]
        total = a.new_zeros(batch)  # [B]
        for tap, lin in zip(taps, self.lins):
            diff_sq = (tap[:batch] - tap[batch:]).pow(2)  # [B, C_tap, h, w]
            total = total + lin(diff_sq).mean(dim=(1, 2, 3))  # [B]
        return total


def distance(name: str, **kwargs) -> Distance:
    """Distance d(a, b) → [B] by name: "squared_l2", "pseudo_huber" (option c), "lpips" (weights_path, resize_to)."""
    if name == "squared_l2":
        if kwargs:
            raise ValueError(f"squared_l2 takes no options, got {sorted(kwargs)}")
        return squared_l2
    if name == "pseudo_huber":
        unknown = set(kwargs) - {"c"}
        if unknown:
            raise ValueError(f"pseudo_huber takes only `c`, got {sorted(unknown)}")
        return partial(pseudo_huber, c=kwargs.get("c"))
    if name == "lpips":
        return LPIPSDistance(**kwargs)
    raise ValueError(f"unknown distance {name!r}; choose one of {', '.join(DISTANCE_NAMES)}")


# ---------------------------------------------------------------------------------------------
# CMT (mid-training)


def cmt_cm_loss(f_pred: Tensor, x0_target: Tensor, distance: Distance) -> Tensor:
    """CMT loss, CM form (Ψ_{t→0}): d(f_θ(x̂_{t_i}, t_i), x̂_{t_0}) per sample; no stop-gradient, no weighting."""
    _check_same_shape(f_pred, x0_target, "f_pred and x0_target")
    return distance(f_pred, x0_target)  # [B]


def preconditioning_transfer_loss(f_pred: Tensor, denoised: Tensor, c_out: TimeLike) -> Tensor:
    """‖(f_θ(x̃, σ̃) − D(x̃, σ̃))/c_out(σ̃)‖² per sample: the student's network output regressed onto the output that
    would make f equal the teacher's denoiser D under the student's own c_skip, c_out (EDM eq. 8's unit-weight form,
    λ(σ̃) = 1/c_out²). Used to re-read a teacher's network through another parameterisation before CMT."""
    _check_same_shape(f_pred, denoised, "f_pred and denoised")
    scale = _per_sample(c_out, f_pred.shape[0], "c_out", f_pred)  # [B]
    if bool((scale == 0).any()):
        raise ValueError("preconditioning_transfer_loss needs c_out != 0 (σ̃ > 0) for every sample")
    return _sum_squares((f_pred - denoised) / column(scale, f_pred))  # [B]


def cmt_mf_loss(h_pred: Tensor, x_i: Tensor, x_j: Tensor, *, t_i: TimeLike, t_j: TimeLike) -> Tensor:
    """CMT mid-training loss, MF form (Ψ_{t→s}): ‖h_θ(x_i, t_i, t_j) − (x_i − x_j)/(t_i − t_j)‖² per sample.

    Flow-matching view: x_i, x_j are trajectory states z at times τ = t_i, t_j of the SAME teacher trajectory,
    so the target is the trajectory's average velocity between them (MeanFlow's u; symmetric in i, j).
    """
    _check_same_shape(h_pred, x_i, "h_pred and x_i")
    _check_same_shape(x_i, x_j, "x_i and x_j")
    batch = x_i.shape[0]
    dt = _per_sample(t_i, batch, "t_i", x_i) - _per_sample(t_j, batch, "t_j", x_i)  # [B]
    if bool((dt == 0).any()):
        raise ValueError("cmt_mf_loss needs t_i != t_j for every sample (the average velocity is undefined at "
                         "t_i == t_j); sample pairs of distinct trajectory points")
    target = (x_i - x_j) / column(dt, x_i)  # [B, ...]
    return _sum_squares(h_pred - target)  # [B]


# ---------------------------------------------------------------------------------------------
# ECT / ECD (post-training of Ψ_{t→0})


def ect_target(f_r: Tensor, x0: Tensor, *, r: TimeLike) -> Tensor:
    """ECT target sg(f_θ(x_r, r)), with the clean sample x0 wherever r == 0 (boundary condition f(x, 0) = x); r = σ̃."""
    _check_same_shape(f_r, x0, "f_r and x0")
    r = _per_sample(r, x0.shape[0], "r", x0)  # [B]
    at_boundary = (r == 0).reshape(-1, *([1] * (x0.dim() - 1)))  # [B, 1, ..., 1]
    return torch.where(at_boundary, x0, f_r.detach())  # [B, ...]


def ect_loss(
    f_t: Tensor,
    f_r: Tensor,
    *,
    t: TimeLike,
    r: TimeLike,
    weighting: Literal["pseudo_huber", "power"] = "pseudo_huber",
    c: float | None = None,
    p: float = 0.5,
) -> Tensor:
    """ECT loss w(t, r)·d(f_θ(x_t, t), sg(f_θ(x_r, r))) with w = 1/(t − r) (ECT's consistency loss, Δt-weighted).

    f_r is DETACHED here (the caller may also compute it under no_grad); build it with `ect_target` so r == 0
    uses the clean sample. With Δ² = ‖f_t − f_r‖² (sum over elements) the per-sample distance is
      "pseudo_huber": √(Δ² + c²) − c, c=None → iCT's 0.00054·√d (c = 0 gives ECT's plain L2 norm), or
      "power":        Δ² / sg((Δ² + c)^p), c=None → 1e-3 (ECT's adaptive weighting; p = 0.5 ≈ pseudo-Huber),
    then divided by (t − r) > 0, t and r in σ̃ (EDM view). ECD uses the same loss: x_r comes from one teacher ODE step
    from x_t (the caller runs it), and f_r = f_θ(x_r, r).
    """
    _check_same_shape(f_t, f_r, "f_t and f_r")
    batch = f_t.shape[0]
    dt = _per_sample(t, batch, "t", f_t) - _per_sample(r, batch, "r", f_t)  # [B]
    if bool((dt <= 0).any()):
        raise ValueError("ect_loss needs t > r for every sample (it divides by t − r); "
                         "draw r with schedules.ect_r_from_t, which keeps 0 <= r < t for t > 0")
    if weighting == "pseudo_huber":
        per_sample = pseudo_huber(f_t, f_r.detach(), c)  # [B]
    elif weighting == "power":
        power_c = MEANFLOW_ADAPTIVE_C if c is None else c
        per_sample = adaptive_weighted_squared_l2(f_t - f_r.detach(), p=p, c=power_c)  # [B]
    else:
        raise ValueError(f"unknown ECT weighting {weighting!r}; choose 'pseudo_huber' or 'power'")
    return per_sample / dt.to(per_sample.dtype)  # [B]


def adaptive_weighted_squared_l2(error: Tensor, *, p: float, c: float) -> Tensor:
    """Adaptive loss sg(w)·‖e‖², w = 1/(‖e‖² + c)^p (MeanFlow's adaptive loss weighting; ECT's p-weighting)."""
    if p < 0:
        raise ValueError(f"adaptive weighting power p must be >= 0, got {p}")
    if c <= 0:
        raise ValueError(f"adaptive weighting constant c must be > 0 (it keeps 1/(‖e‖² + c)^p finite), got {c}")
    squared = _sum_squares(error)  # [B]
    weight = (squared.detach() + c).pow(-p)  # [B]
    return weight * squared  # [B]


# ---------------------------------------------------------------------------------------------
# MeanFlow (post-training of Ψ_{t→s})


def meanflow_target(v: Tensor, du_dt: Tensor, *, t: TimeLike, r: TimeLike) -> Tensor:
    """MeanFlow target u_tgt = v − (t − r)·du/dt (the MeanFlow identity, t and r in τ), returned under stop-gradient."""
    _check_same_shape(v, du_dt, "v and du_dt")
    batch = v.shape[0]
    dt = _per_sample(t, batch, "t", v) - _per_sample(r, batch, "r", v)  # [B]
    return (v - column(dt, v) * du_dt).detach()  # [B, ...]


def meanflow_loss(u_pred: Tensor, u_tgt: Tensor, *, p: float = 1.0, c: float = MEANFLOW_ADAPTIVE_C) -> Tensor:
    """MeanFlow loss sg(w)·‖u_θ − sg(u_tgt)‖² with its adaptive weight w = 1/(‖e‖² + c)^p."""
    _check_same_shape(u_pred, u_tgt, "u_pred and u_tgt")
    return adaptive_weighted_squared_l2(u_pred - u_tgt.detach(), p=p, c=c)  # [B]


def guided_velocity(
    v: Tensor, u_uncond: Tensor, omega: TimeLike, *, kappa: TimeLike = 0.0, u_cond: Tensor | None = None
) -> Tensor:
    """MeanFlow's guided velocity ṽ = ω·v + (1 − ω − κ)·u_uncond + κ·u_cond (the official code's `guidance_fn`).

    v is the sample velocity ε − x0; u_uncond = u_θ(z, t=τ, r=τ | ∅) and u_cond = u_θ(z, t=τ, r=τ | c) are the network's
    own velocities, computed by the caller under no_grad. ω and κ are scalars or one per sample [B] (the caller sets
    ω = 1, κ = 0 outside the guidance interval); κ = 0 is plain CFG ω·v + (1 − ω)·u_uncond, and ω = 1, κ = 0 gives v.
    """
    _check_same_shape(v, u_uncond, "v and u_uncond")
    batch = v.shape[0]
    omega = column(_per_sample(omega, batch, "omega", v), v)  # [B, 1, ..., 1]
    kappa = column(_per_sample(kappa, batch, "kappa", v), v)  # [B, 1, ..., 1]
    guided = omega * v + (1.0 - omega - kappa) * u_uncond  # [B, ...]
    if u_cond is None:
        if bool((kappa != 0).any()):
            raise ValueError("guided_velocity with kappa != 0 needs u_cond = u_θ(z, t, t | c)")
        return guided
    _check_same_shape(v, u_cond, "v and u_cond")
    return guided + kappa * u_cond  # [B, ...]


class UFunction(Protocol):
    """An average velocity u(z, *, t, r) → [B, ...] (flow-matching view: t, r in τ), e.g. `FlowMapStudent.velocity`."""

    def __call__(self, z: Tensor, *, t: Tensor, r: Tensor) -> Tensor: ...


def total_derivative_jvp(u_fn: UFunction, z: Tensor, *, t: Tensor, r: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(u, du/dt), MeanFlow's total derivative du/dt = v·∂_z u + ∂_t u by one JVP with tangents (v, 1, 0) for (z, t, r).

    `u_fn(z, t=, r=)` must call the UNWRAPPED module: torch.func.jvp fails on DDP-wrapped modules, and calling
    `ddp.module` skips DDP's gradient all-reduce, so the caller keeps gradients in sync (all-reduce them
    itself, or take the primal u from the wrapped model and only du/dt from `.module`). Models with attention
    or GroupNorm (diffusers UNets) must run inside `trainer.methods.meanflow.jvp_attention_context(model)`: the CPU
    flash SDPA kernel has no forward-AD formula (the math backend is the safe choice on any device). The returned u
    carries the graph to the parameters; du/dt is detached (MeanFlow's target stops its gradient).
    """
    _check_same_shape(z, v, "z and v")

    def positional(z_in: Tensor, t_in: Tensor, r_in: Tensor) -> Tensor:
        """u_fn with positional primals, as torch.func.jvp calls it."""
        return u_fn(z_in, t=t_in, r=r_in)

    u, du_dt = torch.func.jvp(positional, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))  # [B, ...] each
    return u, du_dt.detach()


def central_difference(u_fn: UFunction, z: Tensor, *, t: Tensor, r: Tensor, v: Tensor, delta: float) -> Tensor:
    """du/dt ≈ [u(z + δv, t=t + δ, r=r) − u(z − δv, t=t − δ, r=r)]/(2δ) under no_grad, detached → [B, ...].

    The module must be deterministic across the two calls (eval mode, or one dropout mask), and t ± δ must stay
    inside the model's time range (the caller keeps t − δ ≥ r where that matters).
    """
    _check_same_shape(z, v, "z and v")
    if not delta > 0:
        raise ValueError(f"finite-difference step delta must be > 0, got {delta}")
    with torch.no_grad():
        u_plus = u_fn(z + delta * v, t=t + delta, r=r)  # [B, ...]
        u_minus = u_fn(z - delta * v, t=t - delta, r=r)  # [B, ...]
    return ((u_plus - u_minus) / (2.0 * delta)).detach()


def secant_derivative(
    u_fn: UFunction, z: Tensor, *, t: Tensor, r: Tensor, v: Tensor, delta: float, t_max: float
) -> Tensor:
    """du/dt as the slope of u over a window of up to 2δ along the path, under no_grad, detached → [B, ...]:

        du/dt ≈ [u(z + δ₊·v, t + δ₊, r) − u(z − δ₋·v, t − δ₋, r)]/(δ₊ + δ₋),  δ₊ = min(δ, t_max − t), δ₋ = min(δ, t − r)

    (t, r, t_max in τ; per sample). The window stays inside r ≤ t' ≤ t_max, so it is one-sided at the ends (a
    backward difference at t = t_max) and never evaluates a negative gap t' − r. Where δ₊ + δ₋ = 0 (t = r = t_max)
    it returns 0: MeanFlow multiplies du/dt by t − r = 0 there. A wide window (δ ≫ the 1e-4 of `central_difference`)
    measures the slope of u over the window instead of its local derivative, which wiggles on scales far below 0.01 in
    τ for students whose time embeddings see τ·1000 (README, "Why MeanFlow after CMT makes the student worse").
    """
    _check_same_shape(z, v, "z and v")
    if not delta > 0:
        raise ValueError(f"secant half-width delta must be > 0, got {delta}")
    t64, r64 = t.to(torch.float64), r.to(torch.float64)  # [B]
    ahead = (t_max - t64).clamp(min=0.0, max=delta)  # [B], δ₊
    behind = (t64 - r64).clamp(min=0.0, max=delta)  # [B], δ₋
    width = ahead + behind  # [B]
    with torch.no_grad():
        u_ahead = u_fn(z + column(ahead, z) * v, t=(t64 + ahead).to(t.dtype), r=r)  # [B, ...]
        u_behind = u_fn(z - column(behind, z) * v, t=(t64 - behind).to(t.dtype), r=r)  # [B, ...]
        slope = (u_ahead - u_behind) / column(width.clamp(min=1e-12), z)  # [B, ...]
    return torch.where(column(width > 0, z).bool(), slope, torch.zeros_like(slope)).detach()


def total_derivative_fd(
    u_fn: UFunction, z: Tensor, *, t: Tensor, r: Tensor, v: Tensor, delta: float
) -> tuple[Tensor, Tensor]:
    """(u, du/dt) with u computed with gradients and du/dt by `central_difference` (JVP-free)."""
    du_dt = central_difference(u_fn, z, t=t, r=r, v=v, delta=delta)  # [B, ...]
    return u_fn(z, t=t, r=r), du_dt
