"""Random-k sparsification with a shared index set: a linear codec
(Stich, Cordonnier, Jaggi, NeurIPS 2018; Wangni, Wang, Liu, Zhang, NeurIPS 2018).

Every worker draws the same k = max(1, ⌊ρ·d⌋) coordinates from the generator shared by all workers
for this step and tensor (``info.generator(device, shared=True)``), so only the k values travel and
all-reduce can sum them. Indices are never sent: the receiver draws them again.

The default ρ = 0.1 because the rescaled codec's variance grows as d/k: at ρ = 0.01 it no longer
trains without error feedback.

Sampling: ``uniform`` is a uniformly random k-subset (O(d) per draw); ``stratified`` cuts [0, d)
into k strata of ⌊d/k⌋ or ⌈d/k⌉ coordinates and takes one uniformly random coordinate from each
(O(k), spread evenly). With ``rescale`` each sent value is multiplied by the inverse of its
inclusion probability (d/k, or the stratum size), which makes the codec unbiased,
E[D(C(x))] = x, with E‖D(C(x)) − x‖² ≈ (d/k − 1)‖x‖². Without it, use error feedback:
E‖x − D(C(x))‖² = (1 − k/d)‖x‖².
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.packet import Packet, PacketError
from compressors.sparse_index import check_density, density_count

#: ``info.generator`` purpose of the shared index draw.
INDEX_PURPOSE = 0x52414E44


@register
@dataclass(frozen=True)
class RandomK(Codec):
    name: ClassVar[str] = "randomk"
    kind: ClassVar[Kind] = Kind.LINEAR
    summary: ClassVar[str] = "k shared-seed random coordinates, values only; unbiased when rescaled"
    source: ClassVar[str] = "Stich, Cordonnier, Jaggi, NeurIPS 2018; Wangni et al., NeurIPS 2018"

    density: float = 0.1
    rescale: bool = True
    sampling: Literal["stratified", "uniform"] = "stratified"

    @property
    def unbiased(self) -> bool:
        return self.rescale

    def __post_init__(self) -> None:
        check_density(self.density)

    def support(self, info: TensorInfo, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared sorted indices and their inverse inclusion probabilities (fp32)."""
        d = info.numel
        k = density_count(self.density, d)
        g = info.generator(device, purpose=INDEX_PURPOSE, shared=True)
        if self.sampling == "uniform":
            idx = torch.randperm(d, generator=g, device=device)[:k].sort().values
            return idx, torch.full((k,), d / k, dtype=torch.float32, device=device)
        bounds = torch.arange(k + 1, device=device, dtype=torch.int64) * d // k
        size = bounds[1:] - bounds[:-1]
        u = torch.rand(k, generator=g, device=device, dtype=torch.float64)
        idx = bounds[:-1] + torch.minimum((u * size).to(torch.int64), size - 1)
        return idx, size.to(torch.float32)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        flat = x.reshape(-1).to(torch.float32)
        idx, scale = self.support(info, flat.device)
        values = flat[idx] * scale if self.rescale else flat[idx]
        return Packet(self.name, flat.numel(), (values,))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        (values,) = self.check(packet, info, 1)
        idx, _ = self.support(info, values.device)
        if values.shape != idx.shape:
            raise PacketError(f"randomk packet holds {tuple(values.shape)} values, density={self.density} of "
                              f"{packet.numel} elements needs {idx.numel()}")
        out = torch.zeros(packet.numel, dtype=torch.float32, device=values.device)
        return out.index_put_((idx,), values.to(torch.float32))
