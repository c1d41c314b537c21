"""Load shedding in a replica: generation requests beyond what the engine runs at once
plus ``max_queued_requests`` waiting get a 503 (JSON, with ``Retry-After``) at once,
instead of queueing without bound behind a busy engine.

Counted here, in the replica's event loop, when a request arrives: vLLM's own bound
(``max_num_queued_reqs``) counts a request only once the engine has it, after its prompt
is rendered, so requests arriving together all pass it and a stream refused by it has
already answered 200. Counted in sequences (a chat request with ``n=4`` holds 4), as
vLLM's scheduler runs at most ``max_num_seqs`` of them at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from mmrad.serve.errors import ApiError

RETRY_AFTER_S = "1"


class Admission:
    """Admits requests while at most ``capacity`` sequences are held (``None``: always)."""

    def __init__(self, capacity: int | None):
        self.capacity = capacity
        self.held = 0

    def admit(self, sequences: int) -> Ticket:
        """Hold ``sequences`` until the ticket is released, or refuse with 503 now."""
        if self.capacity is not None and self.held + sequences > self.capacity:
            raise ApiError(
                503,
                f"this replica is full ({self.held} sequences running or queued, limit "
                f"{self.capacity}); retry shortly",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        self.held += sequences
        return Ticket(self, sequences)


class Ticket:
    """Sequences held in an :class:`Admission`. As a context manager it gives them back
    on exit, unless :meth:`keep_for` handed them to a response stream."""

    def __init__(self, admission: Admission, sequences: int):
        self._admission = admission
        self._sequences = sequences
        self._handed_on = False

    def release(self) -> None:
        """Give the sequences back (once; later calls do nothing)."""
        held, self._sequences = self._sequences, 0
        self._admission.held -= held

    def keep_for(self, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """``events`` (a response stream), holding the sequences until it ends."""
        self._handed_on = True

        async def held() -> AsyncIterator[Any]:
            try:
                async for event in events:
                    yield event
            finally:
                self.release()

        return held()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if not self._handed_on or kind is not None:
            self.release()
