"""Diffusion-DPO's pairs: (caption, winner image bytes, loser image bytes) of the non-tie pairs.

A set whose images fit the shuffle buffer is held in memory, in file order, and shuffled each epoch by the
trainer (as before streaming existed). A larger one is a `StreamedItems`: the index of spo.data.stream, an
epoch order that is its block shuffle (the trainer asks it for the order), and only the window(s) of the
current batch in memory.
"""

from __future__ import annotations

import numpy as np
import torch

from spo.data.pickapic import PreferencePair, ReadSummary
from spo.data.stream import DEFAULT_BUFFER_MB, BlockOrder, Filters, PairIndex, UnitReader, build_index, iter_pairs
from spo.errors import SpoInputError


def as_item(pair: PreferencePair) -> tuple[str, bytes, bytes]:
    """(caption, winner, loser) of a non-tie pair."""
    if pair.preferred == 0:
        return pair.caption, pair.image_0, pair.image_1
    return pair.caption, pair.image_1, pair.image_0


def load_pairs(paths: list[str], max_pairs: int, log=print, buffer_bytes: int = DEFAULT_BUFFER_MB << 20,
               filters: Filters = Filters()):
    """The non-tie pairs in file order (the first `max_pairs` if set) that `filters` keep: a list when they fit
    `buffer_bytes`, else a StreamedItems."""
    index = build_index(paths, filters, buffer_bytes)
    log(index.summary.describe())
    where = ", ".join(str(p) for p in paths)
    if not len(index):
        raise SpoInputError(f"no usable preference pairs in {where}")
    decided = ~index.ties()
    if not decided.any():
        raise SpoInputError(f"all {len(index)} pairs in {where} are ties; Diffusion-DPO needs a winner and a loser")
    if max_pairs:
        decided &= np.cumsum(decided) <= max_pairs
    index = index.subset(decided)
    if index.images_checked or index.image_bytes <= buffer_bytes:
        return [as_item(p) for _, p in iter_pairs(index)]
    return StreamedItems(index, buffer_bytes)


def data_options(cfg) -> tuple[int, Filters]:
    """(buffer bytes, filters) of a config's data settings (spo.train.config.PairsConfig)."""
    from spo.data.stream import buffer_bytes, filters_of

    return buffer_bytes(cfg), filters_of(cfg)


class StreamedItems:
    """Non-tie pairs of a large set by row, each epoch in a block-shuffled order; holds the window(s) in use.

    A row whose image turns out unreadable is counted (in the index's summary) and stands in for by the next
    readable row of its window in this epoch's order: a batch stays full, so processes stay in step.
    """

    def __init__(self, index: PairIndex, buffer_bytes: int):
        self.index, self.buffer_bytes = index, buffer_bytes
        self._reader, self._epoch = UnitReader(), None
        self._held: dict[int, PreferencePair | None] = {}
        self._windows: set[int] = set()
        self._counted: set[tuple[str, int]] = set()  # rows met unusable so far: each counted once in the summary

    def __len__(self) -> int:
        return len(self.index)

    def captions(self) -> list[str]:
        return [self.index.caption(i) for i in range(min(len(self.index), 64))]

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """This epoch's order of rows (a pure function of seed and epoch); later lookups are in this epoch."""
        if self._epoch != (seed, epoch):
            rows, bounds = BlockOrder(self.index, seed, self.buffer_bytes).epoch(epoch)
            self._epoch, self._rows, self._bounds = (seed, epoch), rows, bounds
            self._window_of_row = np.empty(len(rows), dtype=np.int64)
            self._window_of_row[rows] = np.searchsorted(bounds, np.arange(len(rows)), side="right") - 1
            self._held, self._windows = {}, set()
        return torch.from_numpy(self._rows.copy())

    def __getitem__(self, row: int) -> tuple[str, bytes, bytes]:
        w = int(self._window_of_row[row])
        if w not in self._windows:
            self._hold(w)
        if self._held[row] is not None:
            return as_item(self._held[row])
        lo, hi = self._bounds[w], self._bounds[w + 1]
        window = self._rows[lo:hi]
        at = int(np.flatnonzero(window == row)[0])
        for r in np.roll(window, -at)[1:]:
            if self._held[int(r)] is not None:
                return as_item(self._held[int(r)])
        raise SpoInputError(f"no readable pair in the window of {self.index.units[self.index.unit[row]].file}")

    def _hold(self, w: int) -> None:
        """Hold window w and the one before it (a batch may straddle two); forget older ones."""
        self._windows = {w, w - 1} & self._windows | {w}
        self._held = {r: p for r, p in self._held.items() if self._window_of_row[r] in self._windows}
        rows = self._rows[self._bounds[w]:self._bounds[w + 1]]
        met = ReadSummary()
        got = dict(iter_pairs(self.index, rows, reader=self._reader, summary=met))  # unusable rows: left out
        for bad in met.bad_rows:  # every epoch meets them again: count each once
            if (bad.file, bad.row) not in self._counted:
                self._counted.add((bad.file, bad.row))
                self.index.summary.skipped[bad.reason] += 1
                self.index.summary.bad_rows.append(bad)
        self._held.update({int(r): got.get(int(r)) for r in rows})
