"""The training batch sampler: a fixed share of negatives per batch, bank chips in or on top of it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from hem_bootstrap.data.training import KIND_BG, KIND_NEG, KIND_POS, ChipDataset


class RatioBatchSampler(Sampler[list[int]]):
    """Batches with a fixed share of negatives, the rest positives, and bank negatives in or on top of them.

    By default the negative slots are split between bank negatives and random background:
    ``bank_fraction`` of them go to the bank whenever both kinds exist (``None``: in
    proportion to how many chips of each kind there are). A small bank therefore still gets
    its share of every batch instead of drowning among background chips. With ``bank_chips``
    the bank takes no slot of the ``batch_size``: each batch gets ``bank_chips`` bank negatives
    *on top* of the positives and background it would have without a bank, so mined chips add
    to the training mix instead of displacing the positives and background chips a round
    without mining sees (Dalal & Triggs and DPM keep their random negatives too).

    A single global stream of ``batch_size * world_size`` items per step is drawn from
    ``seed``; rank ``r`` takes its own slice, so ranks see disjoint, deterministic chips.
    Each group is walked through in shuffled passes (every chip once per pass, a chip with
    ``dataset.repeats[i] = k`` k times per pass: hard positives); bank negatives with a
    ``weight`` are drawn by weight instead. The bank draws from a random stream of its own, so
    the positives and background chips of every step do not depend on the bank: two runs that
    differ only in their bank train on the same positives and background, which is what makes
    a mined bank and its controls comparable. With no negatives at all the batches are all
    positives.
    """

    def __init__(
        self,
        dataset: ChipDataset,
        batch_size: int,
        neg_fraction: float,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        bank_fraction: float | None = None,
        bank_chips: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if bank_fraction is not None and not 0 <= bank_fraction <= 1:
            raise ValueError(f"bank_fraction must be in [0, 1], got {bank_fraction}")
        if bank_chips is not None and bank_chips < 0:
            raise ValueError(f"bank_chips must be >= 0, got {bank_chips}")
        kinds = dataset.kinds
        repeats = getattr(dataset, "repeats", None)
        pos = np.flatnonzero(kinds == KIND_POS)
        self.pos = np.repeat(pos, repeats[pos]) if repeats is not None else pos
        self.bank = np.flatnonzero(kinds == KIND_NEG)
        self.bg = np.flatnonzero(kinds == KIND_BG)
        w = dataset.weights[self.bank] if len(self.bank) else np.zeros(0)
        self.bank_p = (w / w.sum()) if len(w) and w.sum() > 0 and not np.allclose(w, w[0]) else None
        self.batch_size = int(batch_size)
        on_top = bank_chips is not None
        n_negs = len(self.bg) + (0 if on_top else len(self.bank))
        self.n_neg = int(round(batch_size * neg_fraction)) if n_negs else 0
        if not len(self.pos):
            self.n_neg = self.batch_size
        self.n_pos = self.batch_size - self.n_neg
        if not len(self.bank):
            self.n_bank = 0
        elif on_top:
            self.n_bank = int(bank_chips or 0)
        elif not len(self.bg):
            self.n_bank = self.n_neg
        else:
            share = len(self.bank) / n_negs if bank_fraction is None else bank_fraction
            self.n_bank = int(round(self.n_neg * share))
        self.n_bg = self.n_neg - (0 if on_top else self.n_bank)
        self.num_batches = num_batches
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an infinite RatioBatchSampler has no length")
        return int(self.num_batches)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, 7919])
        bank_rng = np.random.default_rng([self.seed, 7919, 1])
        pos = _Passes(self.pos, rng)
        bank = _Passes(self.bank, bank_rng)
        bg = _Passes(self.bg, rng)
        step = 0
        ws, r = self.world_size, self.rank
        while self.num_batches is None or step < self.num_batches:
            p = pos.take(self.n_pos * ws)
            if self.bank_p is not None and self.n_bank:
                b = bank_rng.choice(self.bank, size=self.n_bank * ws, p=self.bank_p).tolist()
            else:
                b = bank.take(self.n_bank * ws)
            g = bg.take(self.n_bg * ws)
            yield (
                p[r * self.n_pos : (r + 1) * self.n_pos]
                + b[r * self.n_bank : (r + 1) * self.n_bank]
                + g[r * self.n_bg : (r + 1) * self.n_bg]
            )
            step += 1


class _Passes:
    """Shuffled passes over a pool; one draw holds no repeat while the pool allows it."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator) -> None:
        self.pool = pool
        self.n_unique = len(np.unique(pool))
        self.rng = rng
        self.buffer: list[int] = []

    def take(self, k: int) -> list[int]:
        if k == 0 or not len(self.pool):
            return []
        out: list[int] = []
        seen: set[int] = set()
        deferred: list[int] = []
        while len(out) < k:
            if not self.buffer:
                self.buffer = self.rng.permutation(self.pool).tolist()
            x = self.buffer.pop()
            if x in seen and len(seen) < self.n_unique:
                deferred.append(x)  # keep it for the next draw rather than repeat it in this one
                continue
            out.append(x)
            seen.add(x)
        self.buffer.extend(reversed(deferred))
        return out
