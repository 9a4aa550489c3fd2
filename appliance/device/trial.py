"""Trials: a newly activated sequence is on trial until the service's self-test on this device
says it works; then it becomes the last good one, or it is marked bad and the device falls back
to the last good one by itself.

    installed --activate--> trial --self-test passed--> good (last good = it)
                              `--failed, or a model did not load--> bad --> last good active

The service is unprivileged and never writes the store: it writes its result to
`/run/appliance/selftest/<name>-<sequence>.json`; `settle` (root, run by a systemd path unit
when a result appears, and at every start) reads it and commits or falls back. After a power
cut the store still says `trial`, the service tests the sequence again, and `settle` finishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import StoreError

MAX_RESULT = 256 * 1024


def begin(store: Store, name: str, sequence: int) -> bool:
    """About to activate `sequence`: put it on trial unless it is the last good one. Returns
    whether it is on trial. Call with the store lock held, before activating (a crash between
    the two leaves a trial mark on an inactive sequence, which nothing acts on). A trial that
    finished but was not settled yet is settled first, so a pass is not forgotten."""
    _settle_one(store, name)
    on_trial = store.last_good(name) != sequence
    store.set_trial(name, sequence if on_trial else None)
    return on_trial


@dataclass(frozen=True)
class Outcome:
    name: str
    sequence: int
    passed: bool
    summary: str
    fallback: int | None = None  # the sequence activated instead, after a failure


def result_path(layout: Layout, name: str, sequence: int) -> Path:
    return layout.run / "selftest" / f"{name}-{sequence}.json"


def read_result(layout: Layout, name: str, sequence: int) -> dict[str, Any] | None:
    """The service's self-test report of a sequence, or None if there is none (yet)."""
    path = result_path(layout, name, sequence)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        report = json.loads(data[:MAX_RESULT])
    except (ValueError, RecursionError):
        raise StoreError(f"{path} is not a self-test report") from None
    if (not isinstance(report, dict) or report.get("bundle") != name
            or report.get("sequence") != sequence or not isinstance(report.get("passed"), bool)
            or not isinstance(report.get("checks"), list)):
        raise StoreError(f"{path} is not a self-test report of {name} {sequence}")
    return report


def settle(layout: Layout) -> list[Outcome]:
    """Commit or fall back every trial whose self-test has finished. Audited."""
    store = Store(layout)
    with store.locked():
        return [o for name in store.names() if (o := _settle_one(store, name)) is not None]


def _settle_one(store: Store, name: str) -> Outcome | None:
    layout = store.layout
    sequence = store.trial(name)
    if sequence is None or store.active(name) != sequence:
        return None
    report = read_result(layout, name, sequence)
    if report is None:
        return None
    summary = "; ".join(f"{c.get('model')}: {c.get('detail')}"
                        for c in report["checks"] if isinstance(c, dict))[:2000]
    if report["passed"]:
        store.set_last_good(name, sequence)
        store.set_trial(name, None)
        store.set_bad(name, [s for s in store.bad(name) if s != sequence])
        layout.audit.append("trial-pass", bundle=name, sequence=sequence, checks=summary,
                            result="ok")
        return Outcome(name, sequence, True, summary)
    store.mark_bad(name, sequence)
    target = store.last_good(name)
    if target is not None and target in store.sequences(name):
        store.activate(name, target)
    else:  # nothing to fall back to: it stays, and its failing models stay withheld
        target = None
    store.set_trial(name, None)
    layout.audit.append("trial-fail", bundle=name, sequence=sequence, checks=summary,
                        fallback=target, result="rejected")
    return Outcome(name, sequence, False, summary, target)
