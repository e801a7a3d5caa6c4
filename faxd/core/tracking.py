"""What the reconcile worker keeps in memory about faxes, as pure bookkeeping on time passed in.

The store has every fax. Memory holds only the faxes that can still produce an event, so a reconcile
knows which faxes to read by id (the bulk GET), which to check for a stall and which ``Sent`` to settle,
without a query. :class:`Tracker` keeps four things:

* the held faxes: fax id -> its state, the same state the store has (committed before it is held);
* per extension, the ids held and the ids in flight (what a poll reads by id, what an active poll asks
  for, how many faxes are in flight);
* settle waits: one per ``Sent`` journalled with ``final=false`` (``reconcile.sent_settle`` > 0, rule 8
  of :mod:`faxd.core.status`), keyed (fax id, recipient index or None for the fax-level status), with
  the wall time faxd first saw that ``Sent``; and per fax the number of its waits;
* stall marks: held faxes whose ``stalled`` event is journalled, so they are not checked again.

Invariants (they hold after every method; :meth:`Tracker.violations` names any that does not):

1. Of the states it is given, a fax is held if and only if it can still produce an event: it is in
   flight, or it has a settle wait. A final fax with no wait is never held.
2. The per-extension indexes are exactly the held faxes, and the held faxes in flight, grouped by
   their extension; there is no empty group.
3. A fax's wait count is the number of its settle waits, and a fax with no wait has no count. Every
   settle wait belongs to a held fax.
4. Stall marks belong to held faxes.

Transitions:

* :meth:`Tracker.hold` takes a committed state: held if in flight or waiting, else it leaves memory.
  Holding a fax anew clears its stall mark: the next check may find the stall again, which the
  journal's dedup key turns into nothing (it costs a check, never an event).
* :meth:`Tracker.committed` takes what one store commit journalled and the states it wrote: a ``Sent``
  with ``final=false`` starts a wait at ``now`` (a wait that exists keeps its first time), a
  ``settled`` ends its wait, then every state is held. When a fax's last wait ends it is held anew:
  it leaves memory unless it is still in flight.
* :meth:`Tracker.due` is the timer rules of one extension at ``now``: a ``stalled`` transition for each
  unmarked fax in flight past ``stall_after`` (when asked to check stalls), a ``settled`` one for each
  wait that held ``settle_after``; a wait whose ``Sent`` moved on (moot) ends at once.
  :meth:`Tracker.mark_stalled` then marks the faxes whose ``stalled`` was journalled.
* :meth:`Tracker.restore` re-arms, at start-up, the waits the journal still has open.
* :meth:`Tracker.forget` takes faxes the store pruned out of memory, with their waits.

Time only comes in as arguments (Unix seconds, the same clock the waits were started on).
This module must not do I/O, read clocks, or know about the store, REST, metrics or the event loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from faxd.core.model import EventKind, FaxState, Transition
from faxd.core.status import SettleKey, settled, stalled, unsettled


def _grouped(faxes: Iterable[FaxState]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for state in faxes:
        out.setdefault(state.extension_id, set()).add(state.fax_id)
    return out


class Tracker:
    """The faxes that can still produce an event, indexed per extension, with their settle waits."""

    def __init__(self) -> None:
        self._faxes: dict[str, FaxState] = {}
        self._held: dict[str, set[str]] = {}  # extension -> ids held
        self._flying: dict[str, set[str]] = {}  # extension -> ids in flight
        self._stalled: set[str] = set()  # held faxes whose stall was journalled
        self._settle: dict[SettleKey, float] = {}  # wait -> wall time the Sent was first seen
        self._settling: dict[str, int] = {}  # fax id -> number of its waits

    # -- reading -------------------------------------------------------------------------------------

    @property
    def faxes(self) -> Mapping[str, FaxState]:
        """The held faxes by id (read-only: change them through the methods below)."""
        return self._faxes

    def get(self, fax_id: str) -> FaxState | None:
        return self._faxes.get(fax_id)

    def in_flight(self, extension_id: str | None = None) -> list[FaxState]:
        if extension_id is not None:
            return [self._faxes[fax_id] for fax_id in self._flying.get(extension_id, ())]
        return [self._faxes[fax_id] for ids in self._flying.values() for fax_id in ids]

    def in_flight_count(self) -> int:
        return sum(len(ids) for ids in self._flying.values())

    def active_extensions(self) -> list[str]:
        """Extensions with at least one fax in flight."""
        return sorted(self._flying)

    def tracked(self, extension_id: str) -> list[FaxState]:
        """Held faxes of ``extension_id``: in flight or waiting to settle."""
        return [self._faxes[fax_id] for fax_id in self._held.get(extension_id, ())]

    def is_stalled(self, fax_id: str) -> bool:
        """Whether the fax's ``stalled`` is journalled (it is not checked again while held as is)."""
        return fax_id in self._stalled

    def waits(self) -> dict[SettleKey, float]:
        """The settle waits and when each ``Sent`` was first seen (a copy)."""
        return dict(self._settle)

    def next_settle(self, settle_after: float) -> tuple[float, str] | None:
        """(wall time, extension) of the earliest wait due to settle; None when nothing waits."""
        best: tuple[float, str] | None = None
        for (fax_id, _), since in self._settle.items():
            fax = self._faxes.get(fax_id)
            if fax is None:
                continue  # unreachable while invariant 3 holds
            due = since + settle_after
            if best is None or due < best[0]:
                best = (due, fax.extension_id)
        return best

    # -- changing ------------------------------------------------------------------------------------

    def hold(self, state: FaxState) -> None:
        """Keep a committed ``state`` if it can still produce an event, else let it leave memory."""
        fax_id = state.fax_id
        self._drop(fax_id)
        if state.in_flight or fax_id in self._settling:
            self._faxes[fax_id] = state
            self._held.setdefault(state.extension_id, set()).add(fax_id)
            if state.in_flight:
                self._flying.setdefault(state.extension_id, set()).add(fax_id)

    def committed(self, journalled: Iterable[Transition], states: Iterable[FaxState], *, now: float) -> bool:
        """One store commit: ``journalled`` are its new transitions, ``states`` the states it wrote.

        Returns True when a ``Sent`` was journalled not final, i.e. a settle timer may be due sooner.
        """
        waits_began = False
        for t in journalled:
            key = unsettled(t)
            if key is not None:
                self._wait(key, now)
                waits_began = True
            elif t.kind is EventKind.SETTLED:
                self._end_wait((t.fax_id, t.recipient_index))
        for state in states:
            self.hold(state)
        return waits_began

    def restore(self, waits: Iterable[tuple[SettleKey, float]], known: Mapping[str, FaxState]) -> None:
        """Start-up: the waits the journal has open, with when each ``Sent`` was first seen.

        ``known`` are the stored states of waiting faxes not held yet; a wait of a fax neither held
        nor known (no longer in the store) is not restored.
        """
        for key, since in waits:
            if key[0] in self._faxes or key[0] in known:
                self._wait(key, since)
        for state in known.values():
            self.hold(state)

    def due(
        self,
        extension_id: str,
        changed: Mapping[str, FaxState],
        *,
        now: float,
        stall_after: float,
        settle_after: float,
        stalls: bool,
    ) -> list[Transition]:
        """The timer rules of ``extension_id`` at ``now``: ``stalled`` (when ``stalls``), ``settled``.

        ``changed`` holds states read in this reconcile and not committed yet; they count over the
        held ones. Waits that are moot end here; nothing else changes until the result is committed.
        """
        out: list[Transition] = []
        for state in self.in_flight(extension_id) if stalls else ():
            if state.fax_id in self._stalled:
                continue
            t = stalled(changed.get(state.fax_id, state), now=now, stall_after=stall_after)
            if t is not None:
                out.append(t)
        for key, since in list(self._settle.items()):
            fax = changed.get(key[0]) or self._faxes.get(key[0])
            if fax is None:
                self._end_wait(key)  # unreachable while invariant 3 holds
                continue
            if fax.extension_id != extension_id:
                continue
            verdict = settled(fax, key, since=since, now=now, settle_after=settle_after)
            if verdict == "moot":
                self._end_wait(key)
            elif verdict != "wait":
                out.append(verdict)
        return out

    def mark_stalled(self, journalled: Iterable[Transition]) -> None:
        """Mark the held faxes whose ``stalled`` transition is journalled (new, or already there)."""
        self._stalled.update(
            t.fax_id for t in journalled if t.kind is EventKind.STALLED and t.fax_id in self._faxes
        )

    def forget(self, fax_ids: Sequence[str]) -> None:
        """Faxes gone from the store (pruned): they leave memory, their waits with them."""
        for fax_id in fax_ids:
            for key in [k for k in self._settle if k[0] == fax_id]:
                self._end_wait(key)
            self._drop(fax_id)

    def _drop(self, fax_id: str) -> None:
        old = self._faxes.pop(fax_id, None)
        if old is None:
            return
        self._stalled.discard(fax_id)
        for index in (self._held, self._flying):
            ids = index.get(old.extension_id)
            if ids is not None:
                ids.discard(fax_id)
                if not ids:
                    del index[old.extension_id]

    def _wait(self, key: SettleKey, since: float) -> None:
        if key not in self._settle:
            self._settle[key] = since
            self._settling[key[0]] = self._settling.get(key[0], 0) + 1

    def _end_wait(self, key: SettleKey) -> None:
        if self._settle.pop(key, None) is None:
            return
        left = self._settling[key[0]] - 1
        if left:
            self._settling[key[0]] = left
            return
        del self._settling[key[0]]
        held = self._faxes.get(key[0])
        if held is not None:
            self.hold(held)  # nothing waits on it any more: it leaves memory unless in flight

    # -- checking ------------------------------------------------------------------------------------

    def violations(self) -> list[str]:
        """The invariants of the module docstring that do not hold now (empty when all do)."""
        out: list[str] = []
        for fax_id, state in self._faxes.items():
            if fax_id != state.fax_id:
                out.append(f"held under another id: {fax_id}")
            if not state.in_flight and fax_id not in self._settling:
                out.append(f"1: held but can produce no event: {fax_id}")
        if self._held != _grouped(self._faxes.values()):
            out.append("2: the per-extension index of held faxes is not the held faxes")
        if self._flying != _grouped(s for s in self._faxes.values() if s.in_flight):
            out.append("2: the per-extension index of faxes in flight is not the held faxes in flight")
        if self._settling != dict(Counter(fax_id for fax_id, _ in self._settle)):
            out.append("3: wait counts do not match the waits")
        out += [f"3: waits for a fax not held: {f}" for f in sorted(set(self._settling) - set(self._faxes))]
        out += [f"4: stall mark of a fax not held: {f}" for f in sorted(self._stalled - set(self._faxes))]
        return out
