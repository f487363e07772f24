"""Top-k sparsification (Shi, Chu, Cheung, See, 2019): keep the k largest |u_i|.

k = max(1, ⌊ρ·d⌋). Biased, so run it with ``compression.error_feedback: true`` (the EF wrapper keeps
u − Topk(u)). Contraction: ‖u − Topk(u)‖² ≤ (1 − k/d)‖u‖² for every u.

The selection needs no sort of d elements (:func:`compressors.sparse_index.top_magnitudes`: a sampled
threshold, then the exact k-th largest among ≈ 1.1k candidates); ties at the cut go to the lowest indices.

Wire: k fp32 values in index order, then the sorted indices Elias–Fano coded
(:mod:`compressors.sparse_index`, ≈ log2(d/k) + 2 bits each). k follows from (ρ, d), so no length
is sent. Gather kind: different workers keep different supports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.packet import Packet, PacketError
from compressors.sparse_index import check_density, densify, density_count, encode_indices, top_magnitudes


@register
@dataclass(frozen=True)
class TopK(Codec):
    name: ClassVar[str] = "topk"
    kind: ClassVar[Kind] = Kind.GATHER
    fixed_layout: ClassVar[bool] = True
    summary: ClassVar[str] = "k largest magnitudes + Elias-Fano indices; use with error feedback"
    source: ClassVar[str] = "Shi, Chu, Cheung, See: TopK-SGD with error compensation, 2019"

    density: float = 0.01

    def __post_init__(self) -> None:
        check_density(self.density)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        flat = x.reshape(-1)
        n = flat.numel()
        idx = top_magnitudes(flat, density_count(self.density, n))        # ascending
        return Packet(self.name, n, (flat[idx].to(torch.float32), encode_indices(idx, n)))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        values, code = self.check(packet, info, 2)
        k = density_count(self.density, packet.numel)
        if values.numel() != k:
            raise PacketError(f"topk packet holds {values.numel()} values, density={self.density} of "
                              f"{packet.numel} elements needs {k}")
        return densify(values, code, packet.numel)
