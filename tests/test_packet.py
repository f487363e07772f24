"""The packet is the unit of truth for bits: exact round trips, loud failures on bad bytes."""

from __future__ import annotations

import pytest
import torch

import compressors
from compressors import Packet, PacketError, TensorInfo, make_codec, pack_frame, unpack_frame

ALL_CODECS = sorted(compressors.REGISTRY)


def _encode(name: str, n: int = 4096, seed: int = 0):
    codec = make_codec(name)
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    info = TensorInfo("layer.weight", (64, n // 64), seed=seed)
    return codec, info, x, codec.encode(x, info)


@pytest.mark.parametrize("name", ALL_CODECS)
def test_round_trip_through_bytes_decodes_identically(name):
    codec, info, _, packet = _encode(name)
    data = packet.to_bytes()
    assert len(data) == packet.nbytes
    back = Packet.from_bytes(data)
    assert torch.equal(codec.decode(back, info), codec.decode(packet, info))


@pytest.mark.parametrize("name", ALL_CODECS)
def test_every_single_flipped_byte_is_detected(name):
    _, _, _, packet = _encode(name, n=256)
    data = packet.to_bytes()
    for pos in range(0, len(data), max(1, len(data) // 97)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(PacketError):
            Packet.from_bytes(bytes(bad))


@pytest.mark.parametrize("cut", [0, 1, 5, 20, -1])
def test_truncated_packet_raises(cut):
    _, _, _, packet = _encode("qsgd")
    data = packet.to_bytes()
    with pytest.raises(PacketError, match="truncated"):
        Packet.from_bytes(data[:cut] if cut >= 0 else data[:-1])


def test_other_version_is_refused():
    data = bytearray(_encode("none")[3].to_bytes())
    data[2] = 99
    with pytest.raises(PacketError, match="version 99"):
        Packet.from_bytes(bytes(data))


def test_decoding_another_codecs_packet_is_refused():
    _, info, _, packet = _encode("fp16")
    with pytest.raises(PacketError, match="cannot be decoded by 'qsgd'"):
        make_codec("qsgd").decode(packet, info)


def test_frame_holds_packets_back_to_back():
    packets = [_encode(n, seed=i)[3] for i, n in enumerate(["none", "fp16", "qsgd"])]
    frame = pack_frame(packets)
    assert len(frame) == sum(len(p.to_bytes()) for p in packets)
    back = unpack_frame(frame, 3)
    assert [p.codec for p in back] == ["none", "fp16", "qsgd"]
    with pytest.raises(PacketError, match="trailing"):
        unpack_frame(frame + b"x", 3)


def test_dense_bits_per_element_come_from_bytes():
    for name, bits in [("none", 32), ("fp16", 16), ("bf16", 16)]:
        _, _, x, packet = _encode(name, n=1 << 16)
        per_elem = 8 * len(packet.to_bytes()) / x.numel()
        assert bits < per_elem < bits + 0.01  # header + CRC: a few dozen bytes


def test_qsgd_fixed_coding_costs_sign_plus_level_bits_plus_one_norm_per_bucket():
    codec, _, x, packet = _encode("qsgd", n=1 << 16)
    expected_bits = x.numel() * codec.code_bits + 32 * (x.numel() // codec.bucket)
    assert 0 <= 8 * len(packet.to_bytes()) - expected_bits < 8 * 64


def test_a_rank_one_factor_with_a_non_unit_stride_serializes():
    # PowerSGD rank 1: a QR's (n, 1) column comes back with stride (1, n)
    from compressors import TensorInfo, make_codec

    codec = make_codec("powersgd", {"rank": 1})
    info = TensorInfo("w", (64, 32))
    packet = codec.encode(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), info)
    back = Packet.from_bytes(packet.to_bytes())
    assert len(packet.to_bytes()) == packet.nbytes
    torch.testing.assert_close(codec.decode(back, info), codec.decode(packet, info), rtol=0, atol=0)


def test_a_frame_built_in_a_tensor_is_byte_identical_to_to_bytes_for_every_codec():
    from compressors import REGISTRY, TensorInfo, frame_tensor, make_codec, pack_frame, unpack_tensor

    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    packets = [make_codec(name).encode(x, TensorInfo("w", (64, 48))) for name in REGISTRY]
    frame = frame_tensor(packets)
    assert frame.dtype == torch.uint8 and bytes(frame.numpy()) == pack_frame(packets)
    back = unpack_tensor(frame, len(packets))
    assert [p.codec for p in back] == [p.codec for p in packets]
    assert all(torch.equal(a, b) for p, q in zip(packets, back) for a, b in zip(p.fields, q.fields))
    frame[frame.numel() // 2] ^= 0x5A  # one damaged byte: the receiver's CRC check refuses it
    with pytest.raises(PacketError):
        unpack_tensor(frame, len(packets))
