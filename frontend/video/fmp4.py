"""Fragmented MP4 (ISO BMFF) boxes for streaming: an init segment, then self-contained fragments.

Why not FFmpeg's mov muxer: it writes a fragment only when the NEXT packet
arrives (it needs that packet's timestamp), so the last frame of every batch
would wait for the next batch, and its per-frame fragmentation
(`frag_every_frame`) mistimes samples once an audio track is interleaved. Here
a fragment is written exactly when the caller says (after each batch), with
both tracks' samples and exact durations:

    ftyp moov                     init segment (H.264 avc1 track 1, AAC mp4a track 2)
    moof mdat  moof mdat  ...     one fragment per flush; default-base-is-moof, tfdt, trun
    free                          the stream's trailer (see `trailer`)

This is what Media Source Extensions and FFmpeg read. The H.264 stream must
have no B-frames (x264's zerolatency tune), so decode and presentation order
are the same. The AAC encoder's priming samples are skipped with an edit list,
as FFmpeg's own muxer does.
"""
from __future__ import annotations

import json
import struct

TRAILER_PREFIX = b"musetalk:"
VIDEO_TRACK, AUDIO_TRACK = 1, 2
_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
KEY_SAMPLE = 0x02000000  # sample_depends_on = 2: an independent (sync) sample
DELTA_SAMPLE = 0x01010000  # depends on others, and is not a sync sample


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def trailer(status: dict) -> bytes:
    """A top-level `free` box carrying the stream's final status as JSON.

    Players skip `free` boxes, so the body stays a valid MP4; a client that reads
    boxes finds {"status": "done" | "error", ...} at the end, and a stream
    without it was cut short."""
    return box(b"free", TRAILER_PREFIX + json.dumps(status).encode())


def read_trailer(data: bytes) -> dict | None:
    """The status of a stream's trailer, if `data` ends with one."""
    last = None
    for kind, payload in children(data):
        last = (kind, payload)
    if last and last[0] == b"free" and last[1].startswith(TRAILER_PREFIX):
        return json.loads(last[1][len(TRAILER_PREFIX) :])
    return None


def children(data: bytes, offset: int = 0, end: int | None = None):
    """(type, payload) of each complete box in data[offset:end]."""
    end = len(data) if end is None else end
    while offset + 8 <= end:
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size < 8 or offset + size > end:
            return
        yield kind, data[offset + 8 : offset + size]
        offset += size


def video_samples(data: bytes) -> int:
    """How many video frames the fragments (moof boxes) in `data` carry."""
    count = 0
    for kind, moof in children(data):
        if kind != b"moof":
            continue
        for part, traf in children(moof):
            if part != b"traf":
                continue
            boxes = dict(children(traf))
            if struct.unpack(">I", boxes[b"tfhd"][4:8])[0] == VIDEO_TRACK:
                count += struct.unpack(">I", boxes[b"trun"][4:8])[0]
    return count


# -- H.264 ------------------------------------------------------------------------------------
def nal_units(annex_b: bytes) -> list[bytes]:
    """The NAL units of an Annex-B byte stream (start codes 00 00 01 or 00 00 00 01)."""
    units, start, i, n = [], None, 0, len(annex_b)
    while i + 3 <= n:
        if annex_b[i : i + 3] == b"\0\0\1":
            if start is not None:
                units.append(annex_b[start:i].rstrip(b"\0"))
            i += 3
            start = i
        else:
            i += 1
    if start is not None:
        units.append(annex_b[start:])
    return [u for u in units if u]


def length_prefixed(annex_b: bytes) -> bytes:
    """An access unit as MP4 stores it: each NAL unit behind its 4-byte length."""
    return b"".join(struct.pack(">I", len(u)) + u for u in nal_units(annex_b))


def avc_config(extradata: bytes) -> bytes:
    """The avcC box body from the encoder's Annex-B SPS and PPS."""
    units = nal_units(extradata)
    sps = [u for u in units if u[0] & 0x1F == 7]
    pps = [u for u in units if u[0] & 0x1F == 8]
    if not sps or not pps:
        raise ValueError("the H.264 encoder gave no SPS/PPS (global header)")
    profile, compat, level = sps[0][1], sps[0][2], sps[0][3]
    body = bytes([1, profile, compat, level, 0xFF, 0xE0 | len(sps)])
    body += b"".join(struct.pack(">H", len(s)) + s for s in sps)
    body += bytes([len(pps)]) + b"".join(struct.pack(">H", len(p)) + p for p in pps)
    if profile in (100, 110, 122, 144):  # high profiles: 4:2:0, 8 bits, no SPS extensions
        body += bytes([0xFC | 1, 0xF8, 0xF8, 0])
    return body


def codecs(extradata: bytes, audio: bool = True) -> str:
    """The RFC 6381 codecs string MediaSource.isTypeSupported and addSourceBuffer want."""
    avcc = avc_config(extradata)
    video = f"avc1.{avcc[1]:02x}{avcc[2]:02x}{avcc[3]:02x}"
    return f"{video}, mp4a.40.2" if audio else video


# -- the init segment -------------------------------------------------------------------------
def init_segment(width: int, height: int, video_timescale: int, avc_extradata: bytes,
                 audio_rate: int, audio_config: bytes, audio_priming: int) -> bytes:
    ftyp = box(b"ftyp", b"iso5", struct.pack(">I", 512), b"iso5iso6avc1mp41")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0), struct.pack(">IH", 0x10000, 0x100),
                    b"\0" * 10, _MATRIX, b"\0" * 24, struct.pack(">I", AUDIO_TRACK + 1))
    video = _trak(VIDEO_TRACK, video_timescale, b"vide", width, height,
                  _video_entry(width, height, avc_extradata), priming=0)
    audio = _trak(AUDIO_TRACK, audio_rate, b"soun", 0, 0, _audio_entry(audio_rate, audio_config),
                  priming=audio_priming)
    trex = [full_box(b"trex", 0, 0, struct.pack(">IIIII", track, 1, 0, 0, 0)) for track in (VIDEO_TRACK, AUDIO_TRACK)]
    return ftyp + box(b"moov", mvhd, video, audio, box(b"mvex", *trex))


def _trak(track: int, timescale: int, handler: bytes, width: int, height: int, entry: bytes,
          priming: int) -> bytes:
    volume = 0x100 if handler == b"soun" else 0
    tkhd = full_box(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, track, 0, 0), b"\0" * 8,
                    struct.pack(">hhhH", 0, 0, volume, 0), _MATRIX, struct.pack(">II", width << 16, height << 16))
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIII", 0, 0, timescale, 0), struct.pack(">HH", 0x55C4, 0))  # 'und'
    name = b"VideoHandler\0" if handler == b"vide" else b"SoundHandler\0"
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I", 0), handler, b"\0" * 12, name)
    header = full_box(b"vmhd", 0, 1, b"\0" * 8) if handler == b"vide" else full_box(b"smhd", 0, 0, b"\0" * 4)
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), entry),
               full_box(b"stts", 0, 0, struct.pack(">I", 0)), full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
               full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)), full_box(b"stco", 0, 0, struct.pack(">I", 0)))
    parts = [tkhd]
    if priming:  # skip the encoder's priming samples: presentation starts `priming` in
        parts.append(box(b"edts", full_box(b"elst", 0, 0, struct.pack(">IIihh", 1, 0, priming, 1, 0))))
    parts.append(box(b"mdia", mdhd, hdlr, box(b"minf", header, dinf, stbl)))
    return box(b"trak", *parts)


def _video_entry(width: int, height: int, avc_extradata: bytes) -> bytes:
    resolution = struct.pack(">HHII", width, height, 0x480000, 0x480000)  # 72 dpi both ways
    return box(b"avc1", b"\0" * 6, struct.pack(">H", 1), b"\0" * 16, resolution, struct.pack(">IH", 0, 1),
               b"\0" * 32, struct.pack(">Hh", 0x18, -1), box(b"avcC", avc_config(avc_extradata)))


def _audio_entry(rate: int, config: bytes) -> bytes:
    def descriptor(tag: int, body: bytes) -> bytes:
        return bytes([tag, len(body)]) + body

    decoder = descriptor(0x04, bytes([0x40, 0x15]) + b"\0\0\0" + struct.pack(">II", 0, 0) + descriptor(0x05, config))
    es = descriptor(0x03, struct.pack(">HB", AUDIO_TRACK, 0) + decoder + descriptor(0x06, b"\x02"))
    return box(b"mp4a", b"\0" * 6, struct.pack(">H", 1), b"\0" * 8, struct.pack(">HHHHI", 1, 16, 0, 0, rate << 16),
               full_box(b"esds", 0, 0, es))


# -- fragments --------------------------------------------------------------------------------
class Track:
    """Samples of one track waiting for the next fragment, and its decode time so far."""

    def __init__(self, track_id: int):
        self.id = track_id
        self.decode_time = 0
        self.samples: list[tuple[bytes, int, int]] = []  # (data, duration, flags)

    def add(self, data: bytes, duration: int, key: bool = True) -> None:
        self.samples.append((data, duration, KEY_SAMPLE if key else DELTA_SAMPLE))


def fragment(sequence: int, tracks: list[Track]) -> bytes:
    """moof + mdat holding every waiting sample of `tracks`; empties them. b"" if none waits."""
    tracks = [t for t in tracks if t.samples]
    if not tracks:
        return b""

    def moof(offsets: list[int]) -> bytes:
        trafs = []
        for track, offset in zip(tracks, offsets):
            runs = b"".join(struct.pack(">III", duration, len(data), flags) for data, duration, flags in track.samples)
            trafs.append(box(
                b"traf",
                full_box(b"tfhd", 0, 0x020000, struct.pack(">I", track.id)),  # default-base-is-moof
                full_box(b"tfdt", 1, 0, struct.pack(">Q", track.decode_time)),
                full_box(b"trun", 0, 0x000701, struct.pack(">Ii", len(track.samples), offset), runs),
            ))
        return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)

    sizes = [sum(len(d) for d, _, _ in t.samples) for t in tracks]
    header = len(moof([0] * len(tracks))) + 8  # the offsets' values do not change the size
    offsets = [header + sum(sizes[:i]) for i in range(len(tracks))]
    out = moof(offsets) + box(b"mdat", *(d for t in tracks for d, _, _ in t.samples))
    for track in tracks:
        track.decode_time += sum(duration for _, duration, _ in track.samples)
        track.samples.clear()
    return out
