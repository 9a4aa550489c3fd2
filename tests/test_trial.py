"""A new sequence goes live by itself, behind its self-test: trial states in the store, the
service following the store (fake engines), and the privileged settle step that commits or
falls back. The real models go through the same path in test_live_swap.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from factory import Factory
from fakes import (
    CHAT,
    EMBED,
    FILES,
    WHISPER,
    FakeChat,
    FakeEmbed,
    FakeWhisper,
    bundle_doc,
    client,
    fake_settings,
)

from appliance.bundle import keys
from appliance.bundle import manifest as mf
from appliance.device import actions, trial
from appliance.device.install import import_bundle
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import StoreError, UsageError
from appliance.serve import hardware
from appliance.serve import runtime as runtime_mod
from appliance.serve.runtime import Runtime

GOOD = {CHAT: [{"input": "Say hello.", "contains": ["hello"], "max_tokens": 20}],
        WHISPER: [{"input": "models/tiny/clip.wav", "expect": "hello world", "max_wer": 0.2}]}
WRONG = {CHAT: [{"input": "Say hello.", "contains": ["Zanzibar"], "max_tokens": 20}]}


class Device:
    """A state root with a trusted key, a bundle factory and a runtime over fake engines that
    makes new engines for every load (so a swap is visible)."""

    def __init__(self, root: Path) -> None:
        self.layout = Layout(root / "root")
        self.key = Ed25519PrivateKey.generate()
        self.layout.trust.path.mkdir(parents=True)
        kid = keys.key_id(self.key.public_key())
        (self.layout.trust.path / f"{kid}.pub").write_bytes(keys.public_pem(self.key.public_key()))
        (root / "bundles").mkdir()
        self.factory = Factory(root / "bundles", self.key)
        self.chats: list[FakeChat] = []

    def publish(self, sequence: int, checks: dict[str, list[dict[str, Any]]]) -> Path:
        files = {k: v for k, v in FILES.items()  # the clip belongs to a whisper check
                 if WHISPER in checks or not k.endswith("clip.wav")}
        return self.factory.bundle(sequence=sequence, files=files, edit_doc=bundle_doc(checks))

    def install(self, sequence: int, checks: dict[str, list[dict[str, Any]]]) -> None:
        import_bundle(self.publish(sequence, checks), self.layout)

    def runtime(self) -> Runtime:
        def chat(rt: Runtime, inst: Any, m: Any) -> FakeChat:
            self.chats.append(FakeChat())
            return self.chats[-1]

        probe = hardware.Probe(machine="x86_64", system="Linux", cpu_model="fake",
                               logical_cores=2, physical_cores=2, simd=("avx2",),
                               memory_mb=8192, available_mb=8192)
        loaders = {mf.Task.CHAT: chat,
                   mf.Task.EMBEDDINGS: lambda rt, inst, m: FakeEmbed(),
                   mf.Task.TRANSCRIPTION: lambda rt, inst, m: FakeWhisper()}
        rt = Runtime(self.layout, fake_settings(), probe, loaders)
        rt.load()
        return rt

    @property
    def store(self) -> Store:
        return Store(self.layout)


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def _report(layout: Layout, name: str, seq: int, passed: bool) -> None:
    path = trial.result_path(layout, name, seq)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bundle": name, "sequence": seq, "passed": passed,
                                "checks": [{"model": CHAT, "passed": passed, "detail": "x"}]}))


def test_trial_states_commit_and_fall_back(device: Device) -> None:
    store = device.store
    device.install(1, GOOD)
    assert (store.active("demo"), store.trial("demo"), store.last_good("demo")) == (1, 1, None)
    assert trial.settle(device.layout) == []  # no result yet: nothing happens
    _report(device.layout, "demo", 1, True)
    [outcome] = trial.settle(device.layout)
    assert outcome.passed and store.last_good("demo") == 1 and store.trial("demo") is None

    device.install(2, GOOD)
    assert (store.active("demo"), store.trial("demo")) == (2, 2)
    _report(device.layout, "demo", 2, False)
    [outcome] = trial.settle(device.layout)
    assert (outcome.passed, outcome.fallback) == (False, 1)
    assert (store.active("demo"), store.trial("demo"), store.bad("demo")) == (1, None, [2])
    events = [e["event"] for e in device.layout.audit.entries()]
    assert events == ["import", "trial-pass", "import", "trial-fail"]
    assert device.layout.audit.entries()[-1]["fallback"] == 1

    with pytest.raises(UsageError, match="failed its self-test"):
        actions.activate(device.layout, "demo", 2)
    actions.activate(device.layout, "demo", 2, force=True)
    assert (store.active("demo"), store.trial("demo")) == (2, 2)  # on trial again
    seq, _ = actions.rollback(device.layout, "demo")
    assert seq == 1 and store.trial("demo") is None  # the last good one needs no trial


def test_first_bundle_failing_its_check_serves_only_what_passed(device: Device) -> None:
    """Nothing to fall back to: the sequence stays, marked bad, and the models that failed
    their check are withheld, now and after a restart."""
    device.install(1, {**GOOD, CHAT: WRONG[CHAT]})
    rt = device.runtime()
    assert rt.serving == {"demo": 1}
    assert rt.models[CHAT].engine is None and "Zanzibar" in (rt.models[CHAT].error or "")
    assert rt.models[EMBED].engine is not None  # no check of its own failed
    [outcome] = trial.settle(device.layout)
    assert outcome.fallback is None
    assert (device.store.active("demo"), device.store.bad("demo")) == (1, [1])
    rt.close()
    again = device.runtime()  # not on trial any more, but bad: checked again, still withheld
    assert again.models[CHAT].engine is None and again.models[EMBED].engine is not None
    again.close()


def test_prune_keeps_the_last_good_sequence(device: Device) -> None:
    device.install(1, GOOD)
    _report(device.layout, "demo", 1, True)
    trial.settle(device.layout)
    for seq in (2, 3, 4):  # none of them passes: 1 stays the one to fall back to
        device.install(seq, GOOD)
    assert 1 in device.store.sequences("demo")


def test_a_bad_report_changes_nothing(device: Device) -> None:
    device.install(1, GOOD)
    path = trial.result_path(device.layout, "demo", 1)
    path.parent.mkdir(parents=True)
    path.write_text('{"bundle": "demo", "sequence": 9, "passed": true, "checks": []}')
    with pytest.raises(StoreError, match="not a self-test report of demo 1"):
        trial.settle(device.layout)
    assert (device.store.trial("demo"), device.store.last_good("demo")) == (1, None)


def test_service_self_tests_then_swaps_and_retires(device: Device,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_mod, "RETIRE_GRACE", 0.0)
    device.install(1, GOOD)
    rt = device.runtime()
    report = trial.read_result(device.layout, "demo", 1)
    assert report is not None and report["passed"]
    assert {c["model"] for c in report["checks"]} == {CHAT, WHISPER}
    assert rt.serving == {"demo": 1}
    trial.settle(device.layout)

    device.install(2, GOOD)
    first = device.chats[0]
    rt.sync()
    assert rt.serving == {"demo": 2}
    assert rt.chat(CHAT).fingerprint.endswith("-demo-2")
    assert first.closed  # idle, so retired at once (grace 0 here)

    device.install(3, {**GOOD, **WRONG})  # validly signed, but its chat check cannot pass
    rt.sync()
    assert rt.serving == {"demo": 2}  # never served
    failed = trial.read_result(device.layout, "demo", 3)
    assert failed is not None and not failed["passed"]
    assert "lacks ['Zanzibar']" in failed["checks"][0]["detail"]
    # decided by its first failure: the transcription check was not run (a sooner fallback)
    assert failed["checks"][-1]["detail"] == "not run: an earlier check failed"
    assert device.chats[-1].closed  # its engines were closed again
    [outcome] = [o for o in trial.settle(device.layout) if o.sequence == 3]
    assert outcome.fallback == 2 and device.store.bad("demo") == [3]
    rt.sync()
    assert rt.serving == {"demo": 2} and rt.chat(CHAT).fingerprint.endswith("-demo-2")
    rt.close()


def test_model_that_fails_to_load_fails_the_trial(device: Device) -> None:
    device.install(1, GOOD)

    def broken(rt: Runtime, inst: Any, m: Any) -> Any:
        raise RuntimeError("damaged weights")

    rt = device.runtime()
    rt.loaders = {**rt.loaders, mf.Task.EMBEDDINGS: broken}
    device.install(2, GOOD)
    rt.sync()
    report = trial.read_result(device.layout, "demo", 2)
    assert report is not None and not report["passed"]
    assert any(c["model"] == EMBED and "failed to load" in c["detail"] for c in report["checks"])
    assert rt.serving == {"demo": 1}
    rt.close()


def test_no_request_fails_during_a_swap(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that keeps chatting and embedding through a swap sees no failed request."""
    monkeypatch.setattr(runtime_mod, "RETIRE_GRACE", 0.2)
    device.install(1, GOOD)
    rt = device.runtime()
    sdk, _ = client(rt, fake_settings())
    stop, failures, seen = threading.Event(), [], set()

    def keep_asking() -> None:
        while not stop.is_set():
            try:
                r = sdk.chat.completions.create(model=CHAT, messages=[
                    {"role": "user", "content": "hi"}])
                seen.add(r.system_fingerprint)
                sdk.embeddings.create(model=EMBED, input="x")
            except Exception as exc:
                failures.append(repr(exc))

    workers = [threading.Thread(target=keep_asking) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        for seq in (2, 3):
            time.sleep(0.3)
            device.install(seq, GOOD)
            rt.sync()
            time.sleep(0.3)
            rt.sync()  # retire
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert failures == []
    assert {f.rsplit("-", 1)[-1] for f in seen if f} == {"1", "2", "3"}
    rt.close()


def test_drains_first_when_both_do_not_fit(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too little memory for old and new at once: the old engines are drained and closed
    before the new ones load, and status says so."""
    device.install(1, GOOD)
    rt = device.runtime()
    trial.settle(device.layout)
    first = device.chats[0]
    device.install(2, GOOD)
    monkeypatch.setattr(hardware, "meminfo", lambda: (8192, 1))  # 1 MiB free
    rt.sync()
    assert first.closed and rt.serving == {"demo": 2}
    assert rt.swap_note is not None and "drained sequence 1 before loading 2" in rt.swap_note
    assert "drained sequence 1" in json.loads((device.layout.run / "runtime.json").read_text())[
        "swap_note"]
    rt.close()
