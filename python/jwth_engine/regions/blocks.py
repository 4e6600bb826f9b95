"""Where a region's level blocks come from: the slide reader, or the level's stored tiles decoded raw.

`--decode` (slide/decoding.py) applies to the region path as to `score`: with `gpu` or `cpu`, each
level a plan reads is checked once (its test tile against the slide reader, `choose_decoder`) and
its blocks are pasted together from stored tiles that nvImageCodec decodes from their compressed
bytes; a level the raw path cannot take is read by the slide reader, and `describe()` says why,
level by level (it goes into the feature file's attributes).

Neighbouring regions' blocks overlap the same stored tiles (a block is the region's extent plus
one pixel, and region edges do not fall on stored-tile edges): 1.2-1.3x more stored tiles touched
than distinct ones at the main level of the test slides, 1.7x at the synthetic slide's level 1
(5/10/20x, 224 px tiles). On the raw path
each stored tile is decoded once: `expect(plan)` counts the blocks that need each tile, a decoded
tile is kept while another block still needs it and dropped after the last one (row-major regions
hold about one row of boundary tiles), and a thread wanting a tile another thread is decoding
waits for it instead of decoding it again.

Region blocks are read by several threads at once (regions/embed.py), and a TileDecoder is driven
by one thread: each thread decodes with its own single-threaded TileDecoder per level, all sharing
the level's open file. On the GPU the stored tiles are decoded and pasted on the device and the
block stays there: the area filter and the tile cut run on it (regions/resample.py, Pillow's
arithmetic in torch) and the tiles go to the model's preprocessing without a host copy, as in
`score`. When some level of a GPU source is read by the slide reader (the raw path could not take
it), its blocks are copied to the device, so that one region's tiles live in one place.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np

from ..pipeline.locality import paste_units, unit_span, window_in_unit
from ..slide.base import level_to_level0


class SharedTiles:
    """Decoded stored tiles of one level, shared by the blocks (and threads) that need them: each
    is decoded once while `uses` says another block will want it, and dropped after the last."""

    def __init__(self):
        self._uses: Counter = Counter()     # tile id -> blocks still to read it
        self.boxes: dict = {}               # tile id -> (x0, y0, x1, y1) the expected blocks need of it
        self._tiles: dict = {}              # decoded, kept for a later block
        self._pending: dict = {}            # tile id -> Event of the thread decoding it
        self._lock = threading.Lock()
        self.held_max = 0

    def expect(self, uses: Counter, boxes: dict) -> None:
        with self._lock:
            self._uses = Counter(uses)
            self.boxes = dict(boxes)
            self._tiles.clear()

    def get(self, ids: list[int], decode) -> dict:
        """{id: decoded tile} for `ids`, decoding with `decode(ids) -> tiles` only those neither
        held nor being decoded by another thread. Call `done(ids)` once the block is pasted."""
        with self._lock:
            out = {i: self._tiles[i] for i in ids if i in self._tiles}
            waits = {i: self._pending[i] for i in ids if i not in out and i in self._pending}
            mine = [i for i in ids if i not in out and i not in waits]
            event = threading.Event()
            for i in mine:
                self._pending[i] = event
        decoded: dict = {}
        try:
            if mine:
                decoded = dict(zip(mine, decode(mine)))
        finally:        # on failure too: waiters must not wait for ever
            with self._lock:
                for i in mine:
                    del self._pending[i]
                    if i in decoded and self._uses[i] > 1:
                        self._tiles[i] = decoded[i]      # another block still needs it
                self.held_max = max(self.held_max, len(self._tiles))
            event.set()
        out.update(decoded)
        for i, done in waits.items():
            done.wait()
            with self._lock:
                tile = self._tiles.get(i)
            # Absent: the other thread's decode failed (decode it here, to raise its error) or
            # the tile was not worth keeping.
            out[i] = tile if tile is not None else decode([i])[0]
        return out

    def done(self, ids) -> None:
        with self._lock:
            for i in ids:
                self._uses[i] -= 1
                if self._uses[i] <= 0:
                    del self._uses[i]
                    self._tiles.pop(i, None)

    @property
    def held(self) -> int:
        return len(self._tiles)


class BlockSource:
    """`read(level, lx, ly, size)`: the size x size level window at level pixel (lx, ly), uint8 RGB,
    white outside the level (`Slide.read_region` semantics)."""

    def __init__(self, slide, choices: dict | None = None):
        """`choices`: level -> slide.decoding.RawDecodeChoice (levels absent: the slide reader)."""
        self.slide = slide
        self._choices = dict(choices or {})
        # Where blocks are returned: the GPU when any level decodes there, else host numpy arrays.
        self.device = next((c.decoder.device for c in self._choices.values()
                            if c.decoder is not None and c.decoder.backend == "gpu"), None)
        self._local = threading.local()
        self._made: list = []               # every per-thread TileDecoder, closed with the source
        self._shared: dict[int, SharedTiles] = {level: SharedTiles() for level, choice in self._choices.items()
                                                if choice.decoder is not None}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, slide, levels, request=None, *, device=None, plan=None) -> "BlockSource":
        """Blocks of `levels` of `slide` as `request` (a slide.decoding.DecodeRequest; None = the
        slide reader) asks, each level checked on its test tile; `plan` (a RegionPlan): `expect` it."""
        if request is None or request.backend is None:
            return cls(slide, {level: _reader_choice(slide, request) for level in levels})
        from ..slide.decoding import choose_decoder

        choices = {}
        try:
            for level in levels:
                choices[level] = choose_decoder(slide, level, request, device=device, num_threads=1)
        except BaseException:
            for choice in choices.values():
                if choice.decoder is not None:
                    choice.decoder.close()
            raise
        source = cls(slide, choices)
        if plan is not None:
            source.expect(plan)
        return source

    def expect(self, plan) -> None:
        """Count, per raw-decoded level, how many of `plan`'s region blocks need each stored tile
        (once per pass over the plan: a tile read more often than counted is decoded again), and
        the bounding box of what they need of it: where the decoder decodes regions (JPEG on the
        CPU) only that is decoded, as the grid reader does (pipeline/locality.py)."""
        for level, shared in self._shared.items():
            decoder = self._choices[level].decoder
            raw = decoder.raw
            uses: Counter = Counter()
            boxes: dict = {}
            for index in range(len(plan)):
                lx, ly, size = plan.block_window(index, level)
                ids = self._tile_ids(raw, lx, ly, size)[0]
                uses.update(ids)
                if decoder.decodes_regions:
                    for i in ids:
                        need = self._need(raw, lx, ly, size, i)
                        box = boxes.get(i)
                        boxes[i] = need if box is None else (*map(min, box[:2], need[:2]), *map(max, box[2:], need[2:]))
            shared.expect(uses, boxes)

    @staticmethod
    def _need(raw, lx: int, ly: int, size: int, tile_id: int) -> tuple[int, int, int, int]:
        """What the window at (lx, ly) needs of stored tile `tile_id` (its pixels, inside the level)."""
        col, row = raw.position(tile_id)
        return tuple(int(v) for v in window_in_unit(lx, ly, size, col, row, (raw.tile_w, raw.tile_h),
                                                    (raw.width, raw.height)))

    @staticmethod
    def _tile_ids(raw, lx: int, ly: int, size: int):
        """(stored tile ids, column span, row span) the size x size window at (lx, ly) touches."""
        (c0,), (c1,) = unit_span([lx], size, raw.width, raw.tile_w, raw.tiles_across)
        (r0,), (r1,) = unit_span([ly], size, raw.height, raw.tile_h, raw.tiles_down)
        cols, rows = (int(c0), int(c1)), (int(r0), int(r1))
        ids = [row * raw.tiles_across + col for row in range(rows[0], rows[1] + 1)
               for col in range(cols[0], cols[1] + 1)]
        return ids, cols, rows

    def describe(self) -> dict:
        """{level: {"decoder", "why", "test_tile"}} for the feature file and the run's report."""
        return {str(level): choice.to_dict() for level, choice in sorted(self._choices.items())}

    def decoder_names(self) -> dict:
        return {str(level): choice.name for level, choice in sorted(self._choices.items())}

    def read(self, level: int, lx: int, ly: int, size: int):
        """numpy [size, size, 3] uint8, or a torch tensor on `self.device` when that is set."""
        choice = self._choices.get(level)
        if choice is None or choice.decoder is None:
            ds = float(self.slide.info.level_downsamples[level])
            block = self.slide.read_region((level_to_level0(lx, ds), level_to_level0(ly, ds)), level, (size, size))
        else:
            block = self._paste(level, choice, lx, ly, size)
        if self.device is not None and isinstance(block, np.ndarray):
            import torch

            block = torch.from_numpy(np.ascontiguousarray(block)).to(self.device)
        return block

    def _paste(self, level: int, choice, lx: int, ly: int, size: int):
        """The window pasted from the level's stored tiles, decoded raw (each once, SharedTiles)."""
        decoder = self._decoder(level, choice)
        raw = decoder.raw
        ids, cols, rows = self._tile_ids(raw, lx, ly, size)
        shared = self._shared[level]
        units = shared.get(ids, lambda todo: decoder.decode(todo, [shared.boxes.get(i) for i in todo]))
        for i in ids:
            # A window the expected plan did not include (or no plan): its tiles decoded whole.
            box = shared.boxes.get(i)
            if box is not None and not _inside(self._need(raw, lx, ly, size, i), box):
                units[i] = decoder.decode([i])[0]
        if decoder.backend == "gpu":
            import torch

            block = torch.empty((size, size, 3), dtype=torch.uint8, device=decoder.device)
        else:
            block = np.empty((size, size, 3), np.uint8)
        # paste_units paints what no stored tile covers white; TileDecoder paints a stored tile's
        # part outside the level white.
        paste_units(block, lx, ly, units, (raw.tile_w, raw.tile_h), raw.tiles_across, raw.tiles_down, cols, rows)
        shared.done(ids)
        return block

    def _decoder(self, level: int, choice):
        """This thread's single-threaded TileDecoder of `level`, on the open file of the checked
        decoder (which keeps the file and counts the test tile)."""
        mine = getattr(self._local, "decoders", None)
        if mine is None:
            mine = self._local.decoders = {}
        decoder = mine.get(level)
        if decoder is None:
            from ..slide.nvimgcodec_decoder import TileDecoder

            checked = choice.decoder
            decoder = mine[level] = TileDecoder(checked.source, checked.raw, backend=checked.backend,
                                                device=checked.device, stream=None, num_threads=1,
                                                colour_spec=checked.colour_spec)
            with self._lock:
                self._made.append(decoder)
        return decoder

    @property
    def tiles_held_max(self) -> int:
        """Most decoded stored tiles kept at once for later blocks, over the levels."""
        return sum(shared.held_max for shared in self._shared.values())

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


def _inside(need: tuple, box: tuple) -> bool:
    return box[0] <= need[0] and box[1] <= need[1] and need[2] <= box[2] and need[3] <= box[3]


def _reader_choice(slide, request):
    from ..slide.decoding import RawDecodeChoice

    reader = slide.info.reader
    why = request.why if request is not None else "the slide reader"
    return RawDecodeChoice(None, reader, f"{why}; {reader} decodes")
