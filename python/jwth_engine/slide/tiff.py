"""Pure-Python checks of a TIFF container, run before any native library touches the file.

Native readers answer a truncated or foreign file with a crash or a vague "cannot load"; reading the
header and walking the directory chain (a few hundred bytes per directory) lets us say "the file is
truncated" or "not a TIFF file" instead. This is container bookkeeping only; pixels are never
decoded here.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

# TIFF Compression tag (259) values seen in slide files; cuCIM reports none, so we read the tag.
COMPRESSION_NAMES = {
    1: "none",
    5: "LZW",
    6: "JPEG (old-style)",
    7: "JPEG",
    8: "deflate",
    32946: "deflate",
    32773: "PackBits",
    33003: "JPEG 2000 (Aperio 33003)",
    33005: "JPEG 2000 (Aperio 33005)",
    34712: "JPEG 2000",
    34892: "JPEG (lossy)",
    50000: "zstd",
    50001: "WebP",
    50002: "JPEG XL",
}

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
_INT_FORMATS = {1: "B", 3: "H", 4: "I", 16: "Q", 18: "Q", 13: "I"}
_MAX_IFDS = 4096          # a slide has a handful; a loop in a corrupt chain must not spin forever
_MAX_OFFSETS = 1 << 22    # tiles per level we are willing to check (4M tiles ~ a 500k x 500k level)

TAG_COMPRESSION, TAG_STRIP_OFFSETS, TAG_STRIP_COUNTS = 259, 273, 279
TAG_TILE_OFFSETS, TAG_TILE_COUNTS = 324, 325


def sniff(header: bytes) -> str | None:
    """"tiff" / "bigtiff" from the first bytes, None if they are not a TIFF header."""
    if header[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if header[:4] in (b"II+\x00", b"MM\x00+"):
        return "bigtiff"
    return None


@dataclass(frozen=True)
class TiffSummary:
    ifd_count: int
    compression_code: int | None     # of the first directory (level 0 in every slide format we read)
    problem: str | None              # "truncated: ..." or "corrupt: ...", None when the chain is sound

    @property
    def compression(self) -> str | None:
        if self.compression_code is None:
            return None
        return COMPRESSION_NAMES.get(self.compression_code, f"unknown (TIFF compression {self.compression_code})")


def inspect_tiff(path: str | os.PathLike) -> TiffSummary | None:
    """Walk the directory chain; None if the file is not a TIFF at all."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        header = fh.read(16)
        kind = sniff(header)
        if kind is None:
            return None
        order = "<" if header[:2] == b"II" else ">"
        big = kind == "bigtiff"
        if len(header) < (16 if big else 8):
            return TiffSummary(0, None, f"truncated: the file ends inside the TIFF header ({size} bytes)")
        offset = struct.unpack(order + ("Q" if big else "I"), header[8:16] if big else header[4:8])[0]
        count_fmt, entry_size, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
        count_size, next_size = struct.calcsize(count_fmt), struct.calcsize(next_fmt)
        seen: set[int] = set()
        compression: int | None = None
        ifds = 0
        while offset:
            if offset in seen or ifds >= _MAX_IFDS:
                return TiffSummary(ifds, compression, "corrupt: the TIFF directory chain loops")
            seen.add(offset)
            which = "first TIFF directory" if ifds == 0 else f"TIFF directory {ifds + 1}"
            if offset + count_size > size:
                return TiffSummary(ifds, compression,
                                   f"truncated: the {which} is at byte {offset:,} but the file has {size:,} bytes")
            fh.seek(offset)
            (count,) = struct.unpack(order + count_fmt, fh.read(count_size))
            table_end = offset + count_size + count * entry_size + next_size
            if table_end > size:
                return TiffSummary(ifds, compression,
                                   f"truncated: the {which} ends at byte {table_end:,} but the file has {size:,} bytes")
            raw = fh.read(count * entry_size)
            tags = {}
            for i in range(count):
                entry = raw[i * entry_size:(i + 1) * entry_size]
                tag, typ = struct.unpack(order + "HH", entry[:4])
                n = struct.unpack(order + ("Q" if big else "I"), entry[4:12] if big else entry[4:8])[0]
                tags[tag] = (typ, n, entry[12:] if big else entry[8:])
            (next_offset,) = struct.unpack(order + next_fmt, fh.read(next_size))
            if ifds == 0 and TAG_COMPRESSION in tags:
                values = _values(fh, order, big, size, *tags[TAG_COMPRESSION])
                compression = int(values[0]) if values else None
            data_end = _data_end(fh, order, big, size, tags)
            if data_end is not None and data_end > size:
                return TiffSummary(ifds + 1, compression,
                                   f"truncated: image data of the {which} runs to byte {data_end:,} "
                                   f"but the file has {size:,} bytes")
            ifds += 1
            offset = next_offset
        return TiffSummary(ifds, compression, None)


def _values(fh, order: str, big: bool, size: int, typ: int, n: int, inline: bytes) -> list[int] | None:
    fmt = _INT_FORMATS.get(typ)
    if fmt is None or n > _MAX_OFFSETS:
        return None
    nbytes = n * _TYPE_SIZES[typ]
    if nbytes <= len(inline):
        data = inline[:nbytes]
    else:
        (where,) = struct.unpack(order + ("Q" if big else "I"), inline[:8] if big else inline[:4])
        if where + nbytes > size:
            return None  # the caller reports truncation through the data end, or not at all
        fh.seek(where)
        data = fh.read(nbytes)
    return list(struct.unpack(f"{order}{n}{fmt}", data))


def _data_end(fh, order: str, big: bool, size: int, tags: dict) -> int | None:
    """Last byte used by the directory's tiles or strips (None when it cannot tell)."""
    for offsets_tag, counts_tag in ((TAG_TILE_OFFSETS, TAG_TILE_COUNTS), (TAG_STRIP_OFFSETS, TAG_STRIP_COUNTS)):
        if offsets_tag in tags and counts_tag in tags:
            offsets_entry, counts_entry = tags[offsets_tag], tags[counts_tag]
            for typ, n, inline in (offsets_entry, counts_entry):
                fmt = _INT_FORMATS.get(typ)
                if fmt is None or n > _MAX_OFFSETS:
                    return None
                where_bytes = n * _TYPE_SIZES[typ]
                if where_bytes > len(inline):
                    (where,) = struct.unpack(order + ("Q" if big else "I"), inline[:8] if big else inline[:4])
                    if where + where_bytes > size:
                        return where + where_bytes
            offsets = _values(fh, order, big, size, *offsets_entry)
            counts = _values(fh, order, big, size, *counts_entry)
            if not offsets or not counts or len(offsets) != len(counts):
                return None
            # Zero-length tiles are legal (sparse slides) and have meaningless offsets.
            return max((o + c for o, c in zip(offsets, counts) if c), default=0)
    return None
