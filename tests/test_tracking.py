"""The reconcile worker's in-memory bookkeeping (faxd.core.tracking) as tables on passed-in time.

Each scenario is a list of steps as the Reconciler takes them (commit what the store journalled, run the
timer rules, prune...). After every step the test compares what the tracker holds with the table and
checks every invariant of the module docstring (Tracker.violations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from faxd.core.model import EventKind, FaxState, RecipientState, Transition
from faxd.core.status import SettleKey, diff
from faxd.core.tracking import Tracker

T0 = 1_700_000_000.0
STALL = 100.0  # stall_after of these tables
SETTLE = 30.0  # sent_settle of these tables


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def fax(fax_id: str, status: str, *recipients: str, ext: str = "e1", pages: int | None = None) -> FaxState:
    """An outbound fax created at T0 with one recipient per status given (default: one like the fax)."""
    return FaxState(
        fax_id=fax_id,
        extension_id=ext,
        direction="Outbound",
        status=status,
        recipients=tuple(RecipientState(i, None, s) for i, s in enumerate(recipients or (status,))),
        pages=pages,
        created=iso(T0),
    )


Seen = list[tuple[str, str, int | None]]  # (kind, fax id, recipient index) of transitions


def seen(transitions: list[Transition]) -> Seen:
    return [(t.kind.value, t.fax_id, t.recipient_index) for t in transitions]


# -- steps: what the Reconciler does ------------------------------------------------------------------


def commit(
    old: FaxState | None, new: FaxState, now: float, *, settle: bool = True
) -> Callable[[Tracker], Any]:
    """A reconcile (or a send) read ``new``; the store journalled the diff and wrote ``new``."""
    return lambda tr: tr.committed(diff(old, new, settle=settle), [new], now=now)


def timers(
    now: float, *, stalls: bool = True, changed: dict[str, FaxState] | None = None
) -> Callable[[Tracker], Any]:
    """The timer rules of e1 at ``now``, then the commit of what they found (as ``_reconcile`` does)."""

    def step(tr: Tracker) -> Seen:
        found = tr.due("e1", changed or {}, now=now, stall_after=STALL, settle_after=SETTLE, stalls=stalls)
        tr.committed(found, list((changed or {}).values()), now=now)
        tr.mark_stalled(found)
        return seen(found)

    return step


@dataclass(frozen=True)
class View:
    """What the tracker holds after a step (fax ids; waits with their first-seen time)."""

    held: set[str] = field(default_factory=set)
    flying: set[str] = field(default_factory=set)
    waits: dict[SettleKey, float] = field(default_factory=dict)
    stalled: set[str] = field(default_factory=set)


def view(tr: Tracker) -> View:
    return View(
        held=set(tr.faxes),
        flying={f.fax_id for f in tr.in_flight()},
        waits=tr.waits(),
        stalled={f for f in tr.faxes if tr.is_stalled(f)},
    )


ANY = object()


@dataclass(frozen=True)
class Step:
    what: str
    do: Callable[[Tracker], Any]
    then: View
    returns: Any = ANY


Q = fax("a", "Queued")
S = fax("a", "Sent")
D = fax("a", "Delivered")

SCENARIOS: dict[str, list[Step]] = {
    "a fax enters flight and leaves memory when final": [
        Step("RingCentral's answer to a send: Queued", commit(None, Q, T0), View({"a"}, {"a"}), False),
        Step("Sent, no settle period: final", commit(Q, S, T0 + 5, settle=False), View(), False),
    ],
    "a fax first seen final is never held": [
        Step("found Delivered by a full sync", commit(None, D, T0), View(), False),
    ],
    "a Sent is held, out of flight, until it settles after sent_settle": [
        Step("queued", commit(None, Q, T0), View({"a"}, {"a"})),
        Step(
            "Sent, journalled final=false: one wait for the fax, one for the recipient",
            commit(Q, S, T0 + 10),
            View({"a"}, set(), {("a", None): T0 + 10, ("a", 0): T0 + 10}),
            True,
        ),
        Step(
            "the earliest wait",
            lambda tr: tr.next_settle(SETTLE),
            View({"a"}, set(), {("a", None): T0 + 10, ("a", 0): T0 + 10}),
            (T0 + 40, "e1"),
        ),
        Step(
            "not held long enough yet",
            timers(T0 + 39.9),
            View({"a"}, set(), {("a", None): T0 + 10, ("a", 0): T0 + 10}),
            [],
        ),
        Step(
            "held sent_settle: settled, the waits end, the fax leaves memory",
            timers(T0 + 40),
            View(),
            [("settled", "a", None), ("settled", "a", 0)],
        ),
        Step("nothing waits", lambda tr: tr.next_settle(SETTLE), View(), None),
    ],
    "a Sent that moves on before it settles does not settle": [
        Step(
            "first seen Sent", commit(None, S, T0), View({"a"}, set(), {("a", None): T0, ("a", 0): T0}), True
        ),
        Step(
            "a re-read finds it Delivered: the waits are moot", timers(T0 + 5, changed={"a": D}), View(), []
        ),
        Step("the Delivered is committed: still not held", commit(S, D, T0 + 5), View(), False),
    ],
    "a wait keeps the time its Sent was first seen": [
        Step(
            "first seen Sent", commit(None, S, T0), View({"a"}, set(), {("a", None): T0, ("a", 0): T0}), True
        ),
        Step(
            "resent: Queued again, in flight and still waiting",
            commit(S, Q, T0 + 5),
            View({"a"}, {"a"}, {("a", None): T0, ("a", 0): T0}),
            False,
        ),
        Step(
            "Sent again: the waits keep T0",
            commit(Q, S, T0 + 20),
            View({"a"}, set(), {("a", None): T0, ("a", 0): T0}),
            True,
        ),
        Step(
            "settles sent_settle after T0",
            timers(T0 + 30),
            View(),
            [("settled", "a", None), ("settled", "a", 0)],
        ),
    ],
    "in flight and waiting at once: held while either lasts": [
        Step(
            "two recipients queued",
            commit(None, fax("a", "Queued", "Queued", "Queued"), T0),
            View({"a"}, {"a"}),
        ),
        Step(
            "recipient 0 Sent, recipient 1 still queued",
            commit(fax("a", "Queued", "Queued", "Queued"), fax("a", "Queued", "Sent", "Queued"), T0 + 1),
            View({"a"}, {"a"}, {("a", 0): T0 + 1}),
            True,
        ),
        Step(
            "recipient 0 settles; the fax stays (in flight)",
            timers(T0 + 31, stalls=False),
            View({"a"}, {"a"}),
            [("settled", "a", 0)],
        ),
        Step(
            "recipient 1 fails: final, no wait, out of memory",
            commit(
                fax("a", "Queued", "Sent", "Queued"),
                fax("a", "SendingFailed", "Sent", "SendingFailed"),
                T0 + 40,
            ),
            View(),
        ),
    ],
    "a stall is found once, after stall_after, only when stalls are checked": [
        Step("queued at T0", commit(None, Q, T0), View({"a"}, {"a"})),
        Step("not yet stalled", timers(T0 + STALL - 1), View({"a"}, {"a"}), []),
        Step("a push: stalls are not checked", timers(T0 + STALL, stalls=False), View({"a"}, {"a"}), []),
        Step(
            "a poll: stalled, and marked",
            timers(T0 + STALL),
            View({"a"}, {"a"}, stalled={"a"}),
            [("stalled", "a", None)],
        ),
        Step("marked: not checked again", timers(T0 + 2 * STALL), View({"a"}, {"a"}, stalled={"a"}), []),
        Step(
            "a new state is held anew: the mark goes (the journal dedups the repeat)",
            commit(Q, fax("a", "Queued", pages=2), T0 + 250),
            View({"a"}, {"a"}),
        ),
        Step("found again", timers(T0 + 260), View({"a"}, {"a"}, stalled={"a"}), [("stalled", "a", None)]),
        Step("final: out of memory, mark and all", commit(Q, D, T0 + 300), View()),
    ],
    "only faxes held can be marked stalled": [
        Step(
            "a stall journalled for a fax not held",
            lambda tr: tr.mark_stalled(
                [Transition(EventKind.STALLED, "x", "e1", "Outbound", "Queued", "Queued", final=False)]
            ),
            View(),
        ),
    ],
    "start-up: waits come back from the journal for faxes still in the store": [
        Step(
            "loaded in flight", lambda tr: tr.hold(fax("b", "Queued", "Sent", "Queued")), View({"b"}, {"b"})
        ),
        Step(
            "the journal's open waits; c is no longer in the store",
            lambda tr: tr.restore(
                [(("a", None), T0), (("a", 0), T0), (("b", 0), T0 + 1), (("c", None), T0)], {"a": S}
            ),
            View({"a", "b"}, {"b"}, {("a", None): T0, ("a", 0): T0, ("b", 0): T0 + 1}),
        ),
        Step(
            "a settles at T0 + sent_settle",
            timers(T0 + 30),
            View({"b"}, {"b"}, {("b", 0): T0 + 1}),
            [("settled", "a", None), ("settled", "a", 0)],
        ),
    ],
    "pruned faxes leave memory with their waits": [
        Step(
            "first seen Sent", commit(None, S, T0), View({"a"}, set(), {("a", None): T0, ("a", 0): T0}), True
        ),
        Step("pruned", lambda tr: tr.forget(["a", "unknown"]), View()),
    ],
    "a fax whose state did not change is held as it was": [
        Step("queued", commit(None, Q, T0), View({"a"}, {"a"})),
        Step(
            "the same state again (an overlap duplicate)",
            lambda tr: tr.committed([], [Q], now=T0 + 1),
            View({"a"}, {"a"}),
            False,
        ),
    ],
}


@pytest.mark.parametrize("steps", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_transitions(steps: list[Step]) -> None:
    tr = Tracker()
    for step in steps:
        got = step.do(tr)
        if step.returns is not ANY:
            assert got == step.returns, step.what
        assert view(tr) == step.then, step.what
        assert tr.violations() == [], step.what


def test_extensions_are_indexed_apart() -> None:
    tr = Tracker()
    for state in (fax("a", "Queued"), fax("b", "Queued", ext="e2"), fax("c", "Sent", ext="e2")):
        tr.committed(diff(None, state, settle=True), [state], now=T0)
    assert tr.active_extensions() == ["e1", "e2"]
    assert tr.in_flight_count() == 2
    assert [f.fax_id for f in tr.in_flight("e2")] == ["b"]
    assert sorted(f.fax_id for f in tr.tracked("e2")) == ["b", "c"]  # c waits to settle
    assert tr.in_flight("e9") == []
    assert tr.tracked("e9") == []
    # e1's timers leave e2's faxes alone: b is stalled too, c is due to settle.
    assert seen(tr.due("e1", {}, now=T0 + 1000, stall_after=STALL, settle_after=SETTLE, stalls=True)) == [
        ("stalled", "a", None)
    ]
    assert seen(tr.due("e2", {}, now=T0 + 30, stall_after=1e9, settle_after=SETTLE, stalls=True)) == [
        ("settled", "c", None),
        ("settled", "c", 0),
    ]
    tr.committed([], [fax("b", "Delivered", ext="e2")], now=T0 + 40)
    assert tr.active_extensions() == ["e1"]
    assert tr.violations() == []


def test_the_earliest_wait_names_its_extension() -> None:
    tr = Tracker()
    tr.committed(diff(None, fax("a", "Sent"), settle=True), [fax("a", "Sent")], now=T0 + 5)
    tr.committed(diff(None, fax("b", "Sent", ext="e2"), settle=True), [fax("b", "Sent", ext="e2")], now=T0)
    assert tr.next_settle(SETTLE) == (T0 + 30, "e2")


# -- the invariant check itself can fail --------------------------------------------------------------


def _corrupt_held(tr: Tracker) -> None:
    tr._faxes["a"] = S  # final, no wait, yet held (and the in-flight index still names it)


def _corrupt_wait(tr: Tracker) -> None:
    tr._settle[("z", None)] = T0
    tr._settling["z"] = 1


CORRUPTIONS: dict[str, tuple[Callable[[Tracker], object], str]] = {
    "a final fax with no wait held": (_corrupt_held, "1:"),
    "an empty extension group": (lambda tr: tr._held.setdefault("e9", set()), "2:"),
    "a fax missing from the in-flight index": (lambda tr: tr._flying.clear(), "2:"),
    "a wait count off by one": (lambda tr: tr._settling.__setitem__("a", 1), "3:"),
    "a wait for a fax not held": (_corrupt_wait, "3: waits for a fax not held"),
    "a stall mark of a fax not held": (lambda tr: tr._stalled.add("z"), "4:"),
}


@pytest.mark.parametrize(("corrupt", "invariant"), list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_violations_names_each_broken_invariant(corrupt: Callable[[Tracker], object], invariant: str) -> None:
    tr = Tracker()
    tr.committed(diff(None, Q), [Q], now=T0)
    assert tr.violations() == []
    corrupt(tr)
    assert any(v.startswith(invariant) for v in tr.violations()), tr.violations()
