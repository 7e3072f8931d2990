"""Request rows: row r, column p holds the full slot of position p of that request.

Rows never store SWA slots (those come from the allocator's mapping). Columns at or
beyond a request's length hold 0 (padding slot) after `free_row`.
"""

from __future__ import annotations

import torch

from swakv.memory.allocator.base import INDEX_DTYPE


class NoFreeRow(Exception):
    """Every request row is in use."""


class ReqTable:
    def __init__(self, num_rows: int, max_context: int) -> None:
        self.num_rows = num_rows
        self.max_context = max_context
        self.slots = torch.zeros((num_rows, max_context), dtype=INDEX_DTYPE)
        self._free_rows = list(range(num_rows - 1, -1, -1))  # pop() gives 0, 1, 2, ...
        self._in_use = [False] * num_rows

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int:
        if not self._free_rows:
            raise NoFreeRow(f"all {self.num_rows} request rows are in use")
        row = self._free_rows.pop()
        self._in_use[row] = True
        return row

    def free_row(self, row: int) -> None:
        if not (0 <= row < self.num_rows) or not self._in_use[row]:
            raise ValueError(f"row {row} is not in use")
        self.slots[row].zero_()
        self._in_use[row] = False
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Set positions [start, start + len(slots)) of `row`."""
        end = start + int(slots.numel())
        if end > self.max_context:
            raise ValueError(f"position {end} beyond max_context {self.max_context}")
        self.slots[row, start:end] = slots

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        return self.slots[row, start:end]

    def check_integrity(self) -> None:
        assert len(set(self._free_rows)) == len(self._free_rows), "duplicate free rows"
        for r in self._free_rows:
            assert not self._in_use[r], f"free row {r} marked in use"
        assert len(self._free_rows) + sum(self._in_use) == self.num_rows, "rows leaked"
