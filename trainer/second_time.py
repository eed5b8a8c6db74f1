"""The MF form's second time input: a (t − r) embedding added to the network's own time embedding.

MeanFlow (Geng et al. 2025, arXiv 2505.13447, §4 "Conditioning on (r, t)") conditions the network on a second time
through one more timestep embedder whose output is added to the conditioning vector. Here that embedder is
`SecondTimeEmbedding`: the network's own timestep projection (sinusoidal / Fourier features of (t − r)·T, T the number
of training timesteps, as the network sees t·T) followed by a diffusers `TimestepEmbedding` whose last linear layer
starts at zero. Its output is added, through forward hooks, to the output of every module that embeds the network's
main timestep:

- `UNet2DModel`: `time_embedding` (class labels keep their own `class_embedding` slot, so class-conditional UNets take
  a second time input too);
- `DiTTransformer2DModel`: the `timestep_embedder` inside every block's `CombinedTimestepLabelEmbeddings` (diffusers
  keeps one copy per block and one more call for the final layer; all of them get the same (t − r) embedding, as the
  single conditioning vector of the original DiT / MeanFlow networks would).

At init the added embedding is exactly zero, so u(z, t, r) equals the teacher's velocity for every r. The module lives
beside the network (not inside it), so the network keeps the teacher's architecture and config; exports store its
weights in `second_time.safetensors` (`trainer.student`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from torch import Tensor, nn

__all__ = ["SUPPORTED_ARCHITECTURES", "SecondTimeEmbedding", "SecondTimeInputError", "time_embedders"]

SUPPORTED_ARCHITECTURES = "UNet2DModel (positional or Fourier time embedding) and DiTTransformer2DModel"


class SecondTimeInputError(ValueError):
    """A network whose time conditioning cannot take a second time input; names the architecture and what works."""


def time_embedders(net: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """(the net's timestep projection, the modules embedding its main timestep) for the architectures supported."""
    from diffusers import UNet2DModel
    from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, GaussianFourierProjection, Timesteps

    name = type(net).__name__
    if isinstance(net, UNet2DModel):
        if not isinstance(net.time_proj, (Timesteps, GaussianFourierProjection)):
            raise SecondTimeInputError(
                f"{name} with time_embedding_type={net.config.time_embedding_type!r} embeds integer timesteps through a "
                f"lookup table, which cannot take the fractional (t − r)·T: the MF form supports {SUPPORTED_ARCHITECTURES}"
                "; use the CM form (form=cm, methods ect / ecd)"
            )
        return net.time_proj, [net.time_embedding]
    combined = [module for module in net.modules() if isinstance(module, CombinedTimestepLabelEmbeddings)]
    if combined:
        return combined[0].time_proj, [module.timestep_embedder for module in combined]
    raise SecondTimeInputError(
        f"{name} has no time embedding the second time input (t − r) can be added to: the MF form supports "
        f"{SUPPORTED_ARCHITECTURES}; use the CM form (form=cm, methods ect / ecd) for this architecture"
    )


class SecondTimeEmbedding(nn.Module):
    """e(t − r) = TimestepEmbedding(projection((t − r)·T)), zero at init, added to the net's time embedding(s)."""

    def __init__(self, net: nn.Module):
        """Build the embedder for `net` (its projection copied, output width of its time embedding) and hook it in."""
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        projection, targets = time_embedders(net)
        self.projection = copy.deepcopy(projection)
        self.projection.requires_grad_(False)  # sinusoidal: no weights; Fourier: the teacher's fixed random features
        self.embedding = TimestepEmbedding(targets[0].linear_1.in_features, targets[0].linear_2.out_features)
        nn.init.zeros_(self.embedding.linear_2.weight)
        nn.init.zeros_(self.embedding.linear_2.bias)
        self._current: Tensor | None = None
        self._handles = [target.register_forward_hook(self._add) for target in targets]

    def _add(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook on a time embedder: its output plus the (t − r) embedding of the call in progress."""
        if self._current is None:
            raise RuntimeError("a student with a second time input was called outside SecondTimeEmbedding.applied()")
        return output + self._current.to(output.dtype)  # [B, D]

    def embed(self, gap: Tensor) -> Tensor:
        """The embedding of (t − r)·T [B] → [B, D]."""
        features = self.projection(gap)  # [B, F] float32
        return self.embedding(features.to(self.embedding.linear_1.weight.dtype))  # [B, D]

    @contextlib.contextmanager
    def applied(self, gap: Tensor) -> Iterator[None]:
        """Within the block, every forward of the hooked net adds e(gap) [B] to its time embedding."""
        self._current = self.embed(gap)
        try:
            yield
        finally:
            self._current = None
