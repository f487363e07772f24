"""Codecs: pure PyTorch, no Ray, no torch.distributed; device-agnostic.

Every module of this package is imported here, so a codec registers itself just by living in one.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from compressors.base import REGISTRY, Codec, CodecError, Kind, Stateful, TensorInfo, codec_names, make_codec
from compressors.packet import (FrameLayout, Packet, PacketError, frame_tensor, layout_tag, pack_frame, read_frames,
                                to_host, unpack_frame, unpack_tensor)

for _m in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "REGISTRY", "Codec", "CodecError", "Kind", "Packet", "PacketError", "Stateful", "TensorInfo",
    "FrameLayout", "codec_names", "frame_tensor", "layout_tag", "make_codec", "pack_frame", "read_frames",
    "to_host", "unpack_frame", "unpack_tensor",
]
