"""The SPM trainer's batches of preference pairs as a map-style torch Dataset: batch m of process `rank` is a pure
function of (seed, m, rank), so DataLoader workers (`num_workers`) decode and resize images in parallel and give
the very batches one process without workers would, after any resume, on any number of processes.

Global positions m*B*N .. (m+1)*B*N - 1 of the data stream make batch m (B pairs per process, N processes);
process r takes its B of them. `StreamBatches` reads them through spo.data.stream (memory bounded by its
buffer); `MemoryBatches` from a list already in memory (spo.data.pickapic.read_pairs' pairs, the former path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from spo.data.pickapic import REASON_BAD_IMAGE, BadRow, PreferencePair
from spo.data.stream import BlockOrder, PairIndex, UnitReader
from spo.errors import SpoInputError
from spo.images import images_to_tensor


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items start..start+count-1 of the endless stream of per-epoch permutations of range(n)."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(count - len(out), n - offset)
        out.extend(int(i) for i in perm[offset:offset + take])
        pos += take
    return out


@dataclass
class Layout:
    """Who takes which positions: batch size per process, processes, this process."""

    batch_size: int
    world: int = 1
    rank: int = 0

    def first(self, m: int) -> int:
        return (m * self.world + self.rank) * self.batch_size

    def owner(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(batch, process) of each position."""
        per = self.batch_size * self.world
        return positions // per, (positions % per) // self.batch_size


def make_batch(m: int, rows: list[int], captions: list[str], decoded: list, labels, weights, side: int,
               skipped: list[str]) -> dict:
    """What a train batch needs: both images at `side`, captions, labels and weights as float32 tensors."""
    empty = torch.zeros(0, 3, side, side)
    return {"m": m, "rows": rows, "prompts": captions, "skipped": skipped,
            "img0": images_to_tensor([d[0] for d in decoded], side) if decoded else empty,
            "img1": images_to_tensor([d[1] for d in decoded], side) if decoded else empty,
            "label_0": torch.tensor([float(labels[0][i]) for i in rows], dtype=torch.float32),
            "label_1": torch.tensor([float(labels[1][i]) for i in rows], dtype=torch.float32),
            "weight": torch.tensor([float(weights[i]) for i in rows], dtype=torch.float32)}


class MemoryBatches(torch.utils.data.Dataset):
    """Batches from pairs held in memory, in stream_indices' order."""

    def __init__(self, pairs: list[PreferencePair], labels, weights, seed: int, layout: Layout, side: int,
                 total: int):
        self.pairs, self.labels, self.weights, self.seed = pairs, labels, weights, seed
        self.layout, self.side, self.total, self.start = layout, side, total, 0

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, m: int) -> dict:
        rows = stream_indices(len(self.pairs), self.seed, self.layout.first(m), self.layout.batch_size)
        return make_batch(m, rows, [self.pairs[i].caption for i in rows], [self.pairs[i].decode() for i in rows],
                          self.labels, self.weights, self.side, [])


@dataclass
class StreamBatches(torch.utils.data.Dataset):
    """Batches read through a BlockOrder: each worker holds the rows of the current window that its own batches
    will use (the DataLoader hands batch start + j to worker j mod workers), read unit by unit."""

    index: PairIndex
    order: BlockOrder
    labels: tuple
    weights: np.ndarray
    layout: Layout
    side: int
    total: int
    start: int = 0
    _reader: UnitReader = field(default_factory=UnitReader, repr=False)
    _held: dict = field(default_factory=dict, repr=False)  # row -> pair or BadRow
    _windows: set = field(default_factory=set, repr=False)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, m: int) -> dict:
        first, b = self.layout.first(m), self.layout.batch_size
        rows = [int(r) for r in self.order.rows(first, b)]
        windows = {self.order.window_of(p) for p in range(first, first + b)}
        if windows != self._windows:
            self._hold(windows, rows)
        missing = [r for r in rows if r not in self._held]  # a batch another worker was expected to take
        self._held.update(self._reader.read(self.index, np.array(missing, dtype=np.int64)) if missing else {})
        good, decoded, skipped = [], [], []
        for r in rows:
            item = self._held[r]
            images = _decode(item) if isinstance(item, PreferencePair) else None
            if images is None:
                skipped.append((item.reason, str(item)) if isinstance(item, BadRow) else
                               (REASON_BAD_IMAGE, f"{item.source} row {item.row}: an image cannot be decoded"))
            else:
                good.append(r)
                decoded.append(images)
        return make_batch(m, good, [self._held[r].caption for r in good], decoded, self.labels, self.weights,
                          self.side, skipped)

    def _hold(self, windows: set, rows: list[int]) -> None:
        """Hold this worker's rows of the latest window asked for, and of any earlier one only this batch's rows:
        a worker's batches only move forward, so it never needs an earlier window again. Reads what is missing;
        forgets the rest first, so one window (per process, over its workers), not two, is held at a time."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        keep = np.union1d(self._share(max(windows), worker, workers), np.array(rows, dtype=np.int64))
        held = {int(r): self._held[int(r)] for r in keep if int(r) in self._held}
        new = np.array([r for r in keep if int(r) not in held], dtype=np.int64)
        self._held, self._windows = held, windows
        if len(new):
            self._held.update(self._reader.read(self.index, new))

    def _share(self, window: tuple[int, int], worker: int, workers: int) -> np.ndarray:
        """Rows of a window that this worker's batches of this process use."""
        e, w = window
        order, bounds = self.order.epoch(e)
        positions = np.arange(bounds[w], bounds[w + 1], dtype=np.int64) + e * self.order.n
        batch, rank = self.layout.owner(positions)
        mine = (rank == self.layout.rank) & (batch >= self.start) & ((batch - self.start) % workers == worker)
        return order[positions[mine] - e * self.order.n]


def _decode(pair: PreferencePair):
    """Both images, or None where one cannot be decoded (a skip, counted, not a stop)."""
    try:
        return pair.decode()
    except SpoInputError:
        return None


def loader(batches, start: int, workers: int):
    """Batches start, start+1, ... of `batches`, decoded by `workers` DataLoader workers (0: in this process)."""
    batches.start = start
    return iter(torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, len(batches)),
                                            num_workers=workers, persistent_workers=False,
                                            prefetch_factor=2 if workers else None))


# ------------------------------------------------------------------------- either kind of data, one interface
def pair_labels(data) -> tuple:
    """(label_0s, label_1s) by row of a PairIndex or a list of pairs."""
    if isinstance(data, PairIndex):
        return data.label_0, data.label_1
    return [p.label_0 for p in data], [p.label_1 for p in data]


def each_pair(data):
    """(row, pair) of every usable row, in file order (a PairIndex is read one unit at a time; rows found unusable
    are left out uncounted here: training counts them when it meets them)."""
    from spo.data.pickapic import ReadSummary
    from spo.data.stream import iter_pairs

    return iter_pairs(data, summary=ReadSummary()) if isinstance(data, PairIndex) else enumerate(data)


def train_batches(data, labels, seed: int, layout: Layout, side: int, total: int, buffer_bytes: int):
    """The trainer's batch dataset for a PairIndex (streamed) or a list of pairs (in memory)."""
    from spo.data.pickapic import examples_per_prompt

    if isinstance(data, PairIndex):
        return StreamBatches(data, BlockOrder(data, seed, buffer_bytes), labels, data.weights(), layout, side, total)
    return MemoryBatches(data, labels, examples_per_prompt(data), seed, layout, side, total)
