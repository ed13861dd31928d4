"""The freshness-counter policy: how a mirror catches a rolled-back copy of its file.

Every manifest records the counter value it expects. A commit advances the
trusted counter (every ``counter_every`` commits, or once ``counter_interval_s``
seconds have passed); opening a mirror accepts the counter at the expected
value, or one below it (a crash between a commit and its advance, which the
open then finishes). Anything else is a rollback, or a counter of another job.
"""

from __future__ import annotations

import time

from ..counters import Counter
from ..errors import RollbackError
from ._format import Root

__all__ = ["Freshness", "SetFreshness", "counter_bound"]


class Freshness:
    """One mirror's use of its trusted monotonic counter.

    Args:
        counter: the counter, or None (then every check passes and nothing advances).
        every: advance after this many commits (None: never by count).
        interval_s: advance once this many seconds have passed since the last
            advance (None: never by time).
        readonly: the mirror is read-only: never advance the counter.
        label: how errors name the mirror.
    """

    __slots__ = (
        "counter",
        "every",
        "interval_s",
        "label",
        "last_advance",
        "readonly",
        "since_advance",
        "value",
    )

    def __init__(
        self,
        counter: Counter | None,
        every: int | None,
        interval_s: float | None,
        *,
        readonly: bool,
        label: str,
    ) -> None:
        self.counter = counter
        self.every = every
        self.interval_s = interval_s
        self.readonly = readonly
        self.label = label
        self.value = 0  # what the committed manifest expects (set on open)
        self.since_advance = 0
        self.last_advance = time.monotonic()

    @property
    def uses_counter(self) -> bool:
        """Whether the manifests this policy writes record a counter value."""
        return self.counter is not None

    def before_commit(self) -> None:
        """Called once a save's manifest is about to be committed (nothing to do here)."""

    def check_new_allowed(self) -> None:
        """Refuse to create a mirror while the counter says one existed.

        Raises:
            RollbackError: the counter is above 0 (the mirror may have been deleted).
        """
        if self.counter is not None:
            value = self.counter.read()
            if value > 0:
                raise RollbackError(
                    f"{self.label} does not exist (or is empty) but the freshness counter is at "
                    f"{value}: the mirror may have been deleted to roll training back. To start "
                    "a new job on purpose, use a fresh counter (for example a new counter file)"
                )

    def initial_value(self) -> int:
        """The counter value a new mirror's generation 0 expects.

        Normally the counter's value, 0 (``check_new_allowed`` refused any
        other). But a counter that declares ``first_increment_may_jump`` (a TPM
        NV index: once any index on that TPM was deleted, a new one starts
        above the highest value the deleted one had) may go from 0 to any value
        on its first increment. Its base is learned here, by advancing it once
        before generation 0 is committed, and recorded as what generation 0
        expects: every later check stays exact (expected or expected - 1),
        so a rolled-back or deleted mirror is still refused. A crash between
        this increment and the commit leaves no mirror and a counter above 0,
        which is refused like a deleted mirror: nothing was trained yet, and
        the job restarts with a fresh counter.

        Returns:
            The value to record in generation 0's manifest (0 without a counter).

        Raises:
            RollbackError: the counter went backwards on its first increment.
        """
        if self.counter is None:
            return 0
        value = self.counter.read()
        if value == 0 and getattr(self.counter, "first_increment_may_jump", False):
            value = self.counter.increment()
            if value < 1:
                raise RollbackError(
                    f"the freshness counter read {value} after an increment; it is not "
                    f"monotonic, so it cannot protect {self.label}: use another counter"
                )
        return value

    def check_and_catch_up(self, root: Root) -> None:
        """Check the counter against the committed ``root``, finishing an interrupted advance.

        Also resets the count and clock of advances to this open.

        Args:
            root: the committed manifest's root.

        Raises:
            RollbackError: the file is older than the counter says (a rollback),
                or the counter is behind it by more than one (another job's).
        """
        self.value = root.counter_expected
        self.since_advance = 0
        self.last_advance = time.monotonic()
        if self.counter is None:
            return
        value = self.counter.read()
        expected = root.counter_expected
        where = f"{self.label} (generation {root.generation}, step {root.step})"
        if expected < value:
            raise RollbackError(
                f"{where} expects freshness counter value {expected} but the counter is at "
                f"{value}: this is an older copy of the mirror (a rollback). Put the newest copy "
                "back, or start a new job on purpose with a fresh counter"
            )
        if expected > value + 1:
            raise RollbackError(
                f"{where} expects freshness counter value {expected} but the counter is only at "
                f"{value}: the counter was reset or belongs to another job; use this job's counter"
            )
        if expected == value + 1 and not self.readonly:
            # A crash between a commit and its counter advance: finish the advance.
            self.advance_to(expected)
        self.value = expected if not self.readonly else value

    def advance_to(self, expected: int) -> None:
        """Increment the counter until it reads ``expected``.

        Raises:
            RollbackError: it moved past ``expected`` (another job uses it, or
                it starts above zero without saying so).
        """
        assert self.counter is not None
        value = self.counter.read()
        first = value == 0
        while value < expected:
            value = self.counter.increment()
        if value > expected:
            if first:
                # From 0 straight past the expected value on the very first
                # increment: a counter that starts above zero (a re-created TPM
                # NV index does) but did not say so, so this mirror could not
                # learn its base at creation.
                raise RollbackError(
                    f"the freshness counter jumped from 0 to {value} on its first increment, "
                    f"past the {expected} that {self.label} expects: either another job is "
                    "using the same counter, or the counter starts above zero when first "
                    "incremented and its class must declare first_increment_may_jump = True; "
                    "start the job again with a fresh counter"
                )
            raise RollbackError(
                f"the freshness counter moved to {value}, past the {expected} this mirror expects: "
                "another job is using the same counter; give each job its own"
            )

    def next_value(self) -> tuple[int, bool]:
        """The value the next commit expects, and whether that commit advances the counter."""
        if self.counter is None:
            return self.value, False
        by_count = self.every is not None and self.since_advance + 1 >= self.every
        by_time = (
            self.interval_s is not None and time.monotonic() - self.last_advance >= self.interval_s
        )
        if by_count or by_time:
            return self.value + 1, True
        return self.value, False

    def committed(self, expected: int, advance: bool) -> None:
        """After a commit (from :meth:`next_value`'s answer): advance the counter if due.

        Raises:
            RollbackError: as :meth:`advance_to`.
        """
        if advance:
            self.advance_to(expected)
            self.value = expected
            self.since_advance = 0
            self.last_advance = time.monotonic()
        else:
            self.since_advance += 1


class SetFreshness(Freshness):
    """A member's use of its mirror set's counter (one counter for the whole set).

    Made by :mod:`plinius.dist`, which checks the set against the counter when it
    opens (this file's own open checks nothing: going back to the previous
    generation, as a member a save ahead of the others does, is no rollback).
    Every member records in each save the counter value its step expects,
    ``x``: the previous save's plus one every ``every`` saves, the same in
    every member (they save the same steps from the same agreed value). Only
    the *owner* (one process of the job) touches the counter.

    IMPORTANT, the ordering invariant: the owner advances the counter to the
    previous save's value, ``x(k)``, in its save of step ``k+1``, *before* it
    commits that step; and a save of ``k+1`` starts only once every process
    committed ``k`` (the step gate, :class:`plinius.dist.StepGate`). So the
    counter reaches ``x(k)`` only after step ``k`` is globally committed (no
    crash leaves it above the value of the step the set resumes from), and the
    owner holds a step only once the counter reached the value of the save
    before it (no crash leaves it more than one below). A set that reads
    otherwise was rolled back (above) or runs with another job's counter (below).

    Args:
        counter: the set's counter on the owner, ``None`` on the other members.
        every: advance every this many saves.
        label: how errors name the mirror.
    """

    __slots__ = ("_hold",)

    def __init__(self, counter: Counter | None, every: int, *, label: str) -> None:
        super().__init__(counter, every, None, readonly=False, label=label)
        self._hold = False

    @property
    def uses_counter(self) -> bool:
        """Always: every member's manifest records the set's counter value."""
        return True

    def check_new_allowed(self) -> None:
        """Nothing: the set checks a missing member against the counter."""

    def initial_value(self) -> int:
        """The value the set agreed on (see :meth:`resume_at`)."""
        return self.value

    def check_and_catch_up(self, root: Root) -> None:
        """Take the value ``root`` records; the set does the checking (:mod:`plinius.dist`)."""
        self.value = root.counter_expected if root.uses_counter else 0
        self.since_advance = 0

    def resume_at(self, value: int) -> None:
        """Continue from the agreed step, whose saves expect ``value``."""
        self.value = value
        self.since_advance = 0

    def hold_next(self) -> None:
        """The next save rewrites the agreed step (a seeded member): it expects the same value."""
        self._hold = True

    def before_commit(self) -> None:
        """The owner: bring the counter to the previous save's value, before this commit.

        The previous save is globally committed (the step gate let this save
        start only then), so advancing to its value is safe.

        Raises:
            RollbackError: the counter moved past that value (another job uses it).
        """
        if self.counter is not None:
            self.advance_to(self.value)

    def next_value(self) -> tuple[int, bool]:
        """The value this save records (advances are :meth:`before_commit`'s, never here)."""
        if self._hold:
            return self.value, False
        if self.every is not None and self.since_advance + 1 >= self.every:
            return self.value + 1, True
        return self.value, False

    def committed(self, expected: int, advance: bool) -> None:
        """After a commit: the value the next save starts from (the counter is not touched)."""
        if self._hold:  # a rewrite of the agreed step: the count goes on as in the others
            self._hold = False
            return
        self.value = expected
        self.since_advance = 0 if advance else self.since_advance + 1


def counter_bound(uses_counter: bool, every: int, interval: float) -> str:
    """How far back a rolled-back copy could go undetected, in words."""
    if not uses_counter:
        return "no freshness counter: a rolled-back copy of the file would not be detected"
    if every == 1:
        return "counter advanced on every commit: any rolled-back copy is detected"
    parts = []
    if every > 1:
        parts.append(f"{every - 1} commits")
    if interval > 0:
        parts.append(f"{interval:g} seconds of commits")
    return "a rolled-back copy is detected unless it is at most " + " or ".join(parts) + " old"
