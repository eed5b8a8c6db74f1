"""The batch format of every trajectory source: per mode, which points a sample takes and which keys its batch has.

Declared once here and used by the store stream (`trainer.data.stream`), the in-memory source
(`trainer.data.in_memory`) and the online solver (`trainer.data.online`), so every source of the same points gives
bitwise the same batch.

Modes and batch keys (float32 tensors, times [B] float32, `labels` [B] int64 when the stores are conditional)
-------------------------------------------------------------------------------------------------------------
Store order: point 0 = prior noise, point K = the solver's clean endpoint (the paper's t_0). Values are exact
rescalings of the stored states by the stored α and σ: `pipeline.time_convention` gives each point's factor
(the conversions are linear in the state), applied in float64 to the stored values, then cast to float32:

- "cm":        x_t [B,*S] (EDM view x̃ of point i), sigma [B] (its σ̃), x0 [B,*S] (endpoint K in the EDM view);
               points i = 0..K-1 (all, or `points_per_trajectory` of them drawn per trajectory).
- "mf":        z_t, t, z_r, r: two points of one trajectory in the flow-matching view (τ = σ̃/(1+σ̃),
               z = x̃/(1+σ̃)), t > r (t is the noisier point; the endpoint may be r, with τ = 0 when σ_K = 0);
               all pairs, or `pairs_per_trajectory` of them drawn per trajectory.
- "endpoints": x0 [B,*S]: the clean endpoints (EDM view), one sample per trajectory (the stream reads them from the
               store's `endpoint` array: 1/(K+1) of the trajectory bytes; storage schema 2).
- "ecd":       x_t, sigma_t, x_r, sigma_r, x0: consecutive solver points (i, i+1) in the EDM view (one teacher
               ODE step), plus the endpoint; all K steps or `points_per_trajectory` of them per trajectory.

Samples whose two points have equal time are dropped, and so are points with α = 0 (σ̃ = ∞, e.g. τ = 1 of a
flow-matching grid), which the EDM-view student cannot take. With `include_indices=True` stream batches also carry
the `INDEX_KEYS`: int64 `store` (position in `urls`), `index` (trajectory index in its store), `point` (store point
of x_t / z_t / x0) and, except in "endpoints", `point_r` (store point of x0 / z_r / x_r).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from pipeline.time_convention import edm_from_native, fm_from_edm

__all__ = ["BATCH_KEYS", "INDEX_KEYS", "MODES", "POINT_KEYS", "batch_from_template", "sample_template",
           "samples_to_batch"]

MODES = ("cm", "mf", "endpoints", "ecd")
# Which template points ("a", "b", "c" of `sample_template`) a sample of each mode is made of.
POINT_KEYS: dict[str, tuple[str, ...]] = {"cm": ("a", "b"), "mf": ("a", "b"), "endpoints": ("a",),
                                          "ecd": ("a", "b", "c")}
# The keys of each mode's batch (besides `labels` and the INDEX_KEYS), in the order `samples_to_batch` makes them.
BATCH_KEYS: dict[str, tuple[str, ...]] = {
    "cm": ("x_t", "sigma", "x0"),
    "mf": ("z_t", "t", "z_r", "r"),
    "endpoints": ("x0",),
    "ecd": ("x_t", "sigma_t", "x_r", "sigma_r", "x0"),
}
INDEX_KEYS = ("store", "index", "point", "point_r")


def _views(alpha: np.ndarray, sigma: np.ndarray) -> dict[str, np.ndarray]:
    """Per-point factors of the EDM and flow-matching views: view(x) = x · scale, via pipeline.time_convention.

    The conversions are linear in the state, so applying them to a unit state gives the exact factor.
    """
    unit = np.ones_like(alpha)  # [K+1]
    edm_scale, sigma_edm = edm_from_native(unit, alpha, sigma)  # [K+1], [K+1]: 1/α, σ/α
    fm_scale, tau = fm_from_edm(edm_scale, sigma_edm)  # [K+1], [K+1]: 1/(α(1+σ̃)), σ̃/(1+σ̃)
    return {"edm_scale": edm_scale, "sigma_edm": sigma_edm, "fm_scale": fm_scale, "tau": tau}


def sample_template(mode: str, alpha: np.ndarray, sigma: np.ndarray) -> dict[str, np.ndarray]:
    """The samples one trajectory with points (alpha, sigma) [K+1] gives in `mode`: point indices, scales and times.

    point_a / point_b (/ point_c) [M] are the trajectory points of each sample (see the module docstring for the
    modes); a view of a native state x is x · scale_a (EDM view, or flow-matching view in "mf"), at time time_a.
    """
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    num_points = len(alpha)
    last = num_points - 1
    usable = alpha > 0  # [K+1]; α = 0 means σ̃ = ∞
    with np.errstate(divide="ignore", invalid="ignore"):
        view = _views(alpha, sigma)
    sigma_edm, tau = view["sigma_edm"], view["tau"]
    if mode == "cm":
        points_a = np.array([i for i in range(last) if usable[i] and sigma_edm[i] != sigma_edm[last]], np.int64)
        points_b = np.full_like(points_a, last)
    elif mode == "ecd":
        points_a = np.array(
            [i for i in range(last) if usable[i] and usable[i + 1] and sigma_edm[i] != sigma_edm[i + 1]], np.int64
        )
        points_b = points_a + 1
    elif mode == "endpoints":
        points_a = np.array([last] if usable[last] else [], np.int64)
        points_b = points_a.copy()
    else:
        pairs = [
            (a, b) if tau[a] > tau[b] else (b, a)
            for a in range(num_points) for b in range(a + 1, num_points)
            if usable[a] and usable[b] and tau[a] != tau[b]
        ]
        pairs_array = np.array(pairs, np.int64).reshape(-1, 2)  # [M, 2]
        points_a, points_b = pairs_array[:, 0], pairs_array[:, 1]
    view_scale, view_time = (view["fm_scale"], tau) if mode == "mf" else (view["edm_scale"], sigma_edm)
    points_c = np.full_like(points_a, last)
    return {
        "point_a": points_a, "point_b": points_b, "point_c": points_c,
        "scale_a": view_scale[points_a], "scale_b": view_scale[points_b], "scale_c": view["edm_scale"][points_c],
        "time_a": view_time[points_a], "time_b": view_time[points_b],
    }


def samples_to_batch(mode: str, raw: Mapping[str, np.ndarray], scale: Mapping[str, np.ndarray],
                     time: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The mode's batch keys from each sample's native points raw["a"|"b"|"c"] [B, *S], view scales [B] and times [B].

    A view is x · scale computed in float64 from the stored values and cast to float32 (times too), so every source of
    the same points (store stream, in-memory source, online solver) gives bitwise the same batch.
    """

    def state(key: str) -> torch.Tensor:
        """View of the points `key`: [B, *S] float32."""
        values = raw[key].astype(np.float64)  # [B, *S]
        values *= scale[key].reshape((-1,) + (1,) * (values.ndim - 1))
        return torch.from_numpy(values.astype(np.float32))

    def times(key: str) -> torch.Tensor:
        """Per-sample times [B] as float32."""
        return torch.from_numpy(np.asarray(time[key]).astype(np.float32))

    if mode == "cm":
        values = (state("a"), times("a"), state("b"))
    elif mode == "mf":
        values = (state("a"), times("a"), state("b"), times("b"))
    elif mode == "endpoints":
        values = (state("a"),)
    else:
        values = (state("a"), times("a"), state("b"), times("b"), state("c"))
    return dict(zip(BATCH_KEYS[mode], values))


def batch_from_template(mode: str, template: Mapping[str, np.ndarray], trajectories: np.ndarray, rows: np.ndarray,
                        items: np.ndarray) -> dict[str, torch.Tensor]:
    """The batch whose sample b is template sample items[b] of trajectory rows[b] of `trajectories` [N, K+1, *S]."""
    keys = POINT_KEYS[mode]
    return samples_to_batch(
        mode,
        {key: trajectories[rows, template[f"point_{key}"][items]] for key in keys},
        {key: template[f"scale_{key}"][items] for key in keys},
        {key: template[f"time_{key}"][items] for key in ("a", "b")},
    )
