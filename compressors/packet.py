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

import math
import struct
import zlib
from dataclasses import dataclass

import torch

from compressors import crc
from compressors.staging import to_device

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
        """The header's bytes, made once per packet (framing, the layout digest and ``nbytes`` all need them)."""
        header = self.__dict__.get("_header_bytes")
        if header is None:
            header = self.__dict__["_header_bytes"] = self._make_header()  # frozen: bypass __setattr__
        return header

    def _make_header(self) -> bytes:
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

    def write(self, out: torch.Tensor, device_crc: bool | None = None, header: torch.Tensor | None = None) -> int:
        """Write this packet's wire form into the front of the uint8 tensor ``out``; return its length.

        The bytes are exactly :meth:`to_bytes`'s, laid out with tensor copies on ``out``'s device (the header
        is a few host bytes, copied without waiting for the device, or given already there as ``header``; the
        fields are copied as raw bytes, not serialized). The CRC-32 is computed over the written bytes by zlib
        on the CPU, and with tensor operations on other devices (``device_crc`` forces either way), so a GPU
        frame is never read back to the host."""
        if header is None:
            header = to_device(self._header(), torch.uint8, out.device)
        n = header.numel()
        out[:n].copy_(header)
        for f in self.fields:
            k = f.numel() * f.element_size()
            if k:
                out[n:n + k].copy_(f.detach().reshape(-1).contiguous().view(torch.uint8))
            n += k
        if device_crc if device_crc is not None else out.device.type != "cpu":
            out[n:n + _CRC.size].copy_(crc.to_le_bytes(crc.crc32(out[:n])))
        else:
            out[n:n + _CRC.size].copy_(to_device(_CRC.pack(zlib.crc32(out[:n].numpy())), torch.uint8, "cpu"))
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
            torch.frombuffer(bytearray(r), dtype=torch.uint8).view(dtype).reshape(shape)  # copy: writable, aligned
            if len(r) else torch.empty(shape, dtype=dtype)
            for (dtype, shape), r in zip(specs, raw)
        )
        return cls(codec=codec, numel=numel, fields=fields), pos

    def to(self, device: torch.device | str) -> Packet:
        """This packet with its fields on ``device`` (from the host without waiting for the device)."""
        device = torch.device(device)
        return Packet(self.codec, self.numel, tuple(
            to_device(f, f.dtype, device) if f.device.type == "cpu" and device.type != "cpu" else f.to(device)
            for f in self.fields))


def pack_frame(packets: list[Packet]) -> bytes:
    """Concatenate packets into one message (each packet is self-delimiting)."""
    return b"".join(p.to_bytes() for p in packets)


def frame_tensor(packets: list[Packet], device: torch.device | str = "cpu", spare: int = 0,
                 device_crc: bool | None = None) -> torch.Tensor:
    """:func:`pack_frame` as one contiguous uint8 tensor on ``device`` (byte for byte the same), written in
    place with one copy of each field; ``spare`` extra zero bytes may follow (a transport's padding).
    ``device_crc`` as in :meth:`Packet.write`."""
    headers = [p._header() for p in packets]
    total = sum(len(h) + sum(f.numel() * f.element_size() for f in p.fields) + _CRC.size
                for h, p in zip(headers, packets))
    out = torch.empty(total + spare, dtype=torch.uint8, device=device)
    staged = to_device(b"".join(headers), torch.uint8, out.device)  # every header in one copy
    pos = at = 0
    for h, p in zip(headers, packets):
        pos += p.write(out[pos:], device_crc, staged[at:at + len(h)])
        at += len(h)
    if spare:
        out[total:].zero_()
    return out


@dataclass(frozen=True)
class FrameLayout:
    """Where everything sits in a frame of packets whose headers are known in advance.

    A codec with a fixed layout (:attr:`Codec.fixed_layout`) writes the same header (name, element count,
    field dtypes and shapes) for a tensor on every worker at every step; only field bytes and checksums
    differ. A receiver can then take its own frame's layout for every peer's frame of the same length,
    and check and slice peer frames with tensor operations alone (:func:`read_frames`), with no
    per-byte parse on the host.
    """

    packets: tuple[tuple[str, int, tuple[tuple[torch.dtype, tuple[int, ...], int], ...]], ...]
    header_at: tuple[int, ...]   # positions of every header byte in the frame
    nbytes: int
    crc: int                     # zlib.crc32 of any intact frame with this layout

    @classmethod
    def of(cls, packets: list[Packet]) -> FrameLayout:
        described, header_at, lengths, pos = [], [], [], 0
        for p in packets:
            head = len(p._header())
            header_at.extend(range(pos, pos + head))
            at, fields = pos + head, []
            for f in p.fields:
                fields.append((f.dtype, tuple(f.shape), at))
                at += f.numel() * f.element_size()
            described.append((p.codec, p.numel, tuple(fields)))
            lengths.append(p.nbytes)
            pos += p.nbytes
        return cls(tuple(described), tuple(header_at), pos, crc.frame_crc(tuple(lengths)))


def layout_tag(packets: list[Packet]) -> int:
    """A 31-bit nonzero digest of the packets' headers (codec names, element counts, field dtypes and shapes):
    frames of equal length whose tags are equal have, but for a 2^-31 chance, the same layout, so a receiver
    may check and slice them with its own frame's :class:`FrameLayout` (a wrong guess only fails that check).
    Computed on the host from shapes alone; for value-dependent layouts too."""
    return (zlib.crc32(b"".join(p._header() for p in packets)) & 0x7FFFFFFF) or 1


_HEADER_INDEX: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}


def read_frames(frames: torch.Tensor, own: torch.Tensor,
                layout: FrameLayout) -> tuple[torch.Tensor, list[list[Packet]]]:
    """Check and slice a stack of frames (``(workers, nbytes)`` uint8) that should all have ``layout``,
    using only tensor operations on their device: no byte goes to the host, nothing waits for the device.

    A frame is intact when its header bytes equal ``own``'s (this worker's frame with the layout) and its
    CRC-32 over the whole frame is what intact packets give. Returns ``ok`` (a bool tensor, one per frame)
    and every frame's packets; a frame that is not intact is replaced by ``own`` before slicing, so decoding
    it is always safe, and the caller gives it zero weight (``ok``) instead of branching on the host."""
    if frames.dim() != 2 or frames.shape[1] != layout.nbytes or own.numel() != layout.nbytes:
        raise PacketError(f"frames of shape {tuple(frames.shape)} and own frame of {own.numel()} bytes do not "
                          f"match a layout of {layout.nbytes} bytes")
    key = (layout.header_at, str(frames.device))
    header = _HEADER_INDEX.get(key)
    if header is None:  # (read once: another worker thread of this process may clear the cache meanwhile)
        if len(_HEADER_INDEX) > 64:  # layouts change only when the model or the codec does
            _HEADER_INDEX.clear()
        header = _HEADER_INDEX[key] = to_device(layout.header_at, torch.int64, frames.device)
    ok = (crc.crc32(frames) == layout.crc) & (frames[:, header] == own[header]).all(dim=1)
    safe = torch.where(ok.unsqueeze(1), frames, own.unsqueeze(0))
    per_worker: list[list[Packet]] = [[] for _ in range(frames.shape[0])]
    for codec, numel, specs in layout.packets:
        fields = []
        for dtype, shape, at in specs:
            k = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not k:  # (an empty slice keeps the frame's row stride, which a wider dtype may not divide)
                fields.append(torch.empty(safe.shape[0], *shape, dtype=dtype, device=safe.device))
                continue
            # a copy of its own (offset 0, aligned): with one row the slice is already contiguous, and viewing
            # it in place as a wider dtype fails at an odd byte offset
            column = safe[:, at:at + k].clone(memory_format=torch.contiguous_format)
            fields.append(column.view(dtype).reshape(safe.shape[0], *shape))
        for w, packets in enumerate(per_worker):
            packets.append(Packet(codec, numel, tuple(f[w] for f in fields)))
    return ok, per_worker


def to_host(frames: list[torch.Tensor]) -> list[torch.Tensor]:
    """Frames (uint8 tensors) in host memory: frames on a device come back in one copy, not one each."""
    if all(f.device.type == "cpu" for f in frames):
        return frames
    return list(torch.cat([f.reshape(-1) for f in frames]).cpu().split([f.numel() for f in frames]))


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
