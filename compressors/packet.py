"""The wire form of one compressed tensor: a versioned header, typed fields, a CRC-32.

Every bit rayq reports comes from ``len(packet.to_bytes())``: header, side
information (norms, scales, lengths) and payload included. A truncated or corrupted buffer raises
:class:`PacketError`; it never decodes to garbage.

Layout (little endian)::

    magic "RQ" | version u8 | name_len u8 | codec name (ascii) | numel u64 | n_fields u8
    per field:  dtype u8 | ndim u8 | dims u32 * ndim
    field data, in order, raw
    crc32 u32 of everything before it
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

MAGIC = b"RQ"
#: 2: rcfed codes its indices with rayq's rANS (16-bit words); 1 used constriction's ANS (32-bit words)
VERSION = 2

_DTYPES: tuple[torch.dtype, ...] = (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool,
)
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
_PREFIX = struct.Struct("<2sBB")
_NUMEL = struct.Struct("<QB")
_FIELD = struct.Struct("<BB")
_CRC = struct.Struct("<I")


class PacketError(ValueError):
    """A byte buffer is not a valid rayq packet (truncated, corrupted, or another version)."""


@dataclass(frozen=True)
class Packet:
    """One encoded tensor: the codec that made it, the element count it stands for, and its fields.

    Fields are flat or shaped tensors of any dtype in ``_DTYPES`` (byte streams are uint8 tensors).
    Which field means what is the codec's business; the packet only carries them faithfully.
    """

    codec: str
    numel: int
    fields: tuple[torch.Tensor, ...]

    def _header(self) -> bytes:
        name = self.codec.encode("ascii")
        if len(name) > 255:
            raise PacketError(f"codec name too long for a packet header: {self.codec!r}")
        if len(self.fields) > 255:
            raise PacketError(f"a packet holds at most 255 fields, got {len(self.fields)}")
        parts = [_PREFIX.pack(MAGIC, VERSION, len(name)), name, _NUMEL.pack(self.numel, len(self.fields))]
        for f in self.fields:
            if f.dtype not in _DTYPE_CODE:
                raise PacketError(f"field dtype {f.dtype} cannot go on the wire; allowed: {_DTYPES}")
            parts.append(_FIELD.pack(_DTYPE_CODE[f.dtype], f.dim()))
            parts.append(struct.pack(f"<{f.dim()}I", *f.shape))
        return b"".join(parts)

    @property
    def nbytes(self) -> int:
        """Exactly ``len(self.to_bytes())``, without copying the payload off its device."""
        return len(self._header()) + sum(f.numel() * f.element_size() for f in self.fields) + _CRC.size

    def write(self, out: torch.Tensor) -> int:
        """Write this packet's wire form into the front of the uint8 tensor ``out``; return its length.

        The bytes are exactly :meth:`to_bytes`'s, laid out with tensor copies on ``out``'s device (the header
        is a few host bytes; the fields are copied as raw bytes, not serialized). The CRC-32 is computed
        over the written bytes (on the host: for a CUDA frame that is the one device-to-host read)."""
        header = self._header()
        n = len(header)
        out[:n].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        for f in self.fields:
            k = f.numel() * f.element_size()
            if k:
                out[n:n + k].copy_(f.detach().reshape(-1).contiguous().view(torch.uint8))
            n += k
        body = out[:n] if out.device.type == "cpu" else out[:n].cpu()
        out[n:n + _CRC.size].copy_(torch.frombuffer(bytearray(_CRC.pack(zlib.crc32(body.numpy()))), dtype=torch.uint8))
        return n + _CRC.size

    def to_bytes(self) -> bytes:
        body = [self._header()]
        for f in self.fields:
            t = f.detach().reshape(-1).contiguous().cpu()  # flat: a (n, 1) column may keep a stride of n
            body.append(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        blob = b"".join(body)
        return blob + _CRC.pack(zlib.crc32(blob))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> Packet:
        packet, _ = cls.read(data, offset)
        return packet

    @classmethod
    def read(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Packet, int]:
        """Parse one packet starting at ``offset``; return it and the offset just past it."""
        buf = memoryview(data)
        pos = offset

        def take(n: int) -> memoryview:
            nonlocal pos
            if pos + n > len(buf):
                raise PacketError(f"truncated packet: needs {pos + n - offset} bytes, {len(buf) - offset} available")
            view = buf[pos:pos + n]
            pos += n
            return view

        magic, version, name_len = _PREFIX.unpack(take(_PREFIX.size))
        if magic != MAGIC:
            raise PacketError(f"not a rayq packet: magic {bytes(magic)!r} != {MAGIC!r}")
        if version != VERSION:
            raise PacketError(f"packet version {version} is not supported (this rayq reads version {VERSION})")
        try:
            codec = bytes(take(name_len)).decode("ascii")
        except UnicodeDecodeError as err:
            raise PacketError("corrupted packet: codec name is not ascii") from err
        numel, n_fields = _NUMEL.unpack(take(_NUMEL.size))
        specs = []
        for _ in range(n_fields):
            code, ndim = _FIELD.unpack(take(_FIELD.size))
            if code >= len(_DTYPES):
                raise PacketError(f"corrupted packet: unknown dtype code {code}")
            shape = struct.unpack(f"<{ndim}I", take(4 * ndim))
            specs.append((_DTYPES[code], shape))
        raw = []
        for dtype, shape in specs:
            count = 1
            for s in shape:
                count *= s
            raw.append(take(count * torch.empty((), dtype=dtype).element_size()))
        (crc,) = _CRC.unpack(take(_CRC.size))
        if zlib.crc32(buf[offset:pos - _CRC.size]) != crc:
            raise PacketError("corrupted packet: checksum mismatch")
        fields = tuple(
            torch.frombuffer(r, dtype=torch.uint8).clone().view(dtype).reshape(shape)
            if len(r) else torch.empty(shape, dtype=dtype)
            for (dtype, shape), r in zip(specs, raw)
        )
        return cls(codec=codec, numel=numel, fields=fields), pos

    def to(self, device: torch.device | str) -> Packet:
        return Packet(self.codec, self.numel, tuple(f.to(device) for f in self.fields))


def pack_frame(packets: list[Packet]) -> bytes:
    """Concatenate packets into one message (each packet is self-delimiting)."""
    return b"".join(p.to_bytes() for p in packets)


def frame_tensor(packets: list[Packet], device: torch.device | str = "cpu", spare: int = 0) -> torch.Tensor:
    """:func:`pack_frame` as one contiguous uint8 tensor on ``device`` (byte for byte the same), written in
    place with one copy of each field; ``spare`` extra zero bytes may follow (a transport's padding)."""
    total = sum(p.nbytes for p in packets)
    out = torch.empty(total + spare, dtype=torch.uint8, device=device)
    pos = 0
    for p in packets:
        pos += p.write(out[pos:])
    if spare:
        out[total:].zero_()
    return out


def unpack_tensor(frame: torch.Tensor, count: int) -> list[Packet]:
    """:func:`unpack_frame` reading straight from a CPU uint8 tensor's memory (fields are copied once)."""
    data = frame.cpu() if frame.device.type != "cpu" else frame
    return unpack_frame(memoryview(data.numpy()) if data.numel() else b"", count)


def unpack_frame(data: bytes | bytearray | memoryview, count: int) -> list[Packet]:
    """Read exactly ``count`` packets back from :func:`pack_frame`'s output."""
    packets, pos = [], 0
    for _ in range(count):
        p, pos = Packet.read(data, pos)
        packets.append(p)
    if pos != len(data):
        raise PacketError(f"frame has {len(data) - pos} trailing bytes after {count} packets")
    return packets
