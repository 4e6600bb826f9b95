"""Where a region's level blocks come from: the slide reader, or the level's stored tiles decoded raw.

`--decode` (slide/decoding.py) applies to the region path as to `score`: with `gpu` or `cpu`, each
level a plan reads is checked once (its test tile against the slide reader, `choose_decoder`) and
its blocks are pasted together from stored tiles that nvImageCodec decodes from their compressed
bytes; a level the raw path cannot take is read by the slide reader, and `describe()` says why,
level by level (it goes into the feature file's attributes).

Region blocks are read by several threads at once (regions/embed.py), and a TileDecoder is driven
by one thread: each thread decodes with its own single-threaded TileDecoder per level, all sharing
the level's open file. On the GPU the stored tiles are decoded and pasted on the device, and the
block is then copied to the host, where the area filter (PIL) and the tile cut run: the decode,
the costly part, leaves the CPU; the region path does not keep pixels on the device as `score` does.
"""

from __future__ import annotations

import threading

import numpy as np

from ..pipeline.locality import paste_units, unit_span
from ..slide.base import level_to_level0


class BlockSource:
    """`read(level, lx, ly, size)`: the size x size level window at level pixel (lx, ly), uint8 RGB,
    white outside the level (`Slide.read_region` semantics)."""

    def __init__(self, slide, choices: dict | None = None):
        """`choices`: level -> slide.decoding.RawDecodeChoice (levels absent: the slide reader)."""
        self.slide = slide
        self._choices = dict(choices or {})
        self._local = threading.local()
        self._made: list = []               # every per-thread TileDecoder, closed with the source
        self._claimed: set[int] = set()     # levels whose checked decoder a thread has taken
        self._lock = threading.Lock()

    @classmethod
    def open(cls, slide, levels, request=None, *, device=None) -> "BlockSource":
        """Blocks of `levels` of `slide` as `request` (a slide.decoding.DecodeRequest; None = the
        slide reader) asks, each level checked on its test tile."""
        if request is None or request.backend is None:
            return cls(slide, {level: _reader_choice(slide, request) for level in levels})
        from ..slide.decoding import choose_decoder

        source = cls(slide)
        try:
            for level in levels:
                source._choices[level] = choose_decoder(slide, level, request, device=device, num_threads=1)
        except BaseException:
            source.close()
            raise
        return source

    def describe(self) -> dict:
        """{level: {"decoder", "why", "test_tile"}} for the feature file and the run's report."""
        return {str(level): choice.to_dict() for level, choice in sorted(self._choices.items())}

    def decoder_names(self) -> dict:
        return {str(level): choice.name for level, choice in sorted(self._choices.items())}

    def read(self, level: int, lx: int, ly: int, size: int) -> np.ndarray:
        choice = self._choices.get(level)
        if choice is None or choice.decoder is None:
            ds = float(self.slide.info.level_downsamples[level])
            return self.slide.read_region((level_to_level0(lx, ds), level_to_level0(ly, ds)), level, (size, size))
        decoder = self._decoder(level, choice)
        raw = decoder.raw
        unit = (raw.tile_w, raw.tile_h)
        (c0,), (c1,) = unit_span([lx], size, raw.width, raw.tile_w, raw.tiles_across)
        (r0,), (r1,) = unit_span([ly], size, raw.height, raw.tile_h, raw.tiles_down)
        ids = [row * raw.tiles_across + col for row in range(int(r0), int(r1) + 1)
               for col in range(int(c0), int(c1) + 1)]
        units = dict(zip(ids, decoder.decode(ids))) if ids else {}
        if decoder.backend == "gpu":
            import torch

            block = torch.empty((size, size, 3), dtype=torch.uint8, device=decoder.device)
        else:
            block = np.empty((size, size, 3), np.uint8)
        # paste_units paints what no stored tile covers white; TileDecoder paints a stored tile's
        # part outside the level white.
        paste_units(block, lx, ly, units, unit, raw.tiles_across, raw.tiles_down, (int(c0), int(c1)),
                    (int(r0), int(r1)))
        # GPU: one device-to-host copy of the block, ordered after the decode on this thread's stream.
        return block.cpu().numpy() if decoder.backend == "gpu" else block

    def _decoder(self, level: int, choice):
        """This thread's TileDecoder of `level`: the checked one for the first thread, then new
        single-threaded ones on the same open file."""
        mine = getattr(self._local, "decoders", None)
        if mine is None:
            mine = self._local.decoders = {}
        decoder = mine.get(level)
        if decoder is None:
            from ..slide.nvimgcodec_decoder import TileDecoder

            with self._lock:
                claimed = level in self._claimed
                self._claimed.add(level)
            first = choice.decoder
            decoder = first if not claimed else TileDecoder(first.source, first.raw, backend=first.backend,
                                                            device=first.device, stream=None, num_threads=1)
            if decoder is not first:
                with self._lock:
                    self._made.append(decoder)
            mine[level] = decoder
        return decoder

    @property
    def tiles_decoded(self) -> int:
        """Stored tiles decoded raw so far (test tiles included), over all threads and levels."""
        firsts = [c.decoder for c in self._choices.values() if c.decoder is not None]
        return sum(d.tiles_decoded for d in [*firsts, *self._made])

    def close(self) -> None:
        """Return every decoder to its pool and close the raw files. Idempotent."""
        with self._lock:
            made, self._made = self._made, []
        for decoder in made:
            decoder.close(keep_source=True)
        for choice in self._choices.values():
            if choice.decoder is not None:
                choice.decoder.close()


def _reader_choice(slide, request):
    from ..slide.decoding import RawDecodeChoice

    reader = slide.info.reader
    why = request.why if request is not None else "the slide reader"
    return RawDecodeChoice(None, reader, f"{why}; {reader} decodes")
