"""The whole life of a new sequence on a running service, with the real models: import, the
service follows the store, self-tests the variant it chose, switches over without failing a
request, the trial is settled; and a validly signed sequence whose self-test cannot pass is
never served, is marked bad, and the device falls back by itself."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Server, run_tool, start_server
from rebundle import failing_copy

from appliance.device.layout import Layout
from appliance.device.store import Store

pytestmark = pytest.mark.models
CHAT, EMBED = "smollm2-135m-instruct", "all-minilm-l6-v2"
CONFIG = "[chat]\nparallel = 4\nkv_cells = 4096\nctx_per_seq = 512\n"


def wait_for(what: str, check: Any, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def report(root: Path, seq: int) -> dict[str, Any] | None:
    path = root / "run/appliance/selftest" / f"demo-{seq}.json"
    return json.loads(path.read_text()) if path.exists() else None


def settle(root: Path) -> str:
    """What the path unit does on the device when a result appears."""
    done = run_tool("ctl", root, "bundle", "settle")
    assert done.returncode == 0, done.stderr
    return done.stdout


class Traffic:
    """Clients that stream chat and embed without pause, counting failures and noting which
    sequence answered (system_fingerprint)."""

    def __init__(self, server: Server) -> None:
        self.client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.key,
                                    max_retries=0, timeout=120)
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.answers: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self._chat), threading.Thread(target=self._embed)]

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _chat(self) -> None:
        while not self.stop.is_set():
            try:
                stream = self.client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": "Say hi."}],
                    max_tokens=12, temperature=0, stream=True)
                fingerprint = ""
                for chunk in stream:
                    fingerprint = chunk.system_fingerprint or fingerprint
                self.answers.append((time.monotonic(), fingerprint))
            except Exception as exc:
                self.failures.append(f"chat: {exc!r}")

    def _embed(self) -> None:
        while not self.stop.is_set():
            try:
                self.client.embeddings.create(model=EMBED, input="keep going")
            except Exception as exc:
                self.failures.append(f"embeddings: {exc!r}")

    def first_answer_by(self, sequence: int) -> float | None:
        return next((t for t, f in self.answers if f.endswith(f"-demo-{sequence}")), None)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           demo_bundles: tuple[Path, Path]) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("swap") / "root", demo_bundles, CONFIG)
    yield srv
    srv.stop()


def test_first_sequence_is_self_tested_at_start(server: Server) -> None:
    first = wait_for("the self-test of 1", lambda: report(server.root, 1))
    assert first["passed"], first
    details = {c["model"]: c for c in first["checks"]}
    assert set(details) == {CHAT, EMBED, "whisper-tiny.en"}
    assert details[EMBED]["variant"] == "int8"  # checked on the variant this device chose
    assert "passed; it is the last good sequence" in settle(server.root)
    assert Store(Layout(server.root)).last_good("demo") == 1


def test_new_sequence_goes_live_without_a_failed_request(server: Server,
                                                         demo_bundles: tuple[Path, Path]) -> None:
    steady = rss_mib(server.proc.pid)
    peak = [steady]
    watching = threading.Event()

    def watch_memory() -> None:
        while not watching.is_set():
            peak[0] = max(peak[0], rss_mib(server.proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_memory)
    watcher.start()
    with Traffic(server) as traffic:
        time.sleep(2)
        imported = run_tool("ctl", server.root, "bundle", "import",
                            str(demo_bundles[1] / "demo-2.bundle"))
        assert imported.returncode == 0, imported.stderr
        since = time.monotonic()
        wait_for("an answer from sequence 2", lambda: traffic.first_answer_by(2))
        time.sleep(2)  # the old engines drain and close while traffic goes on
    watching.set()
    watcher.join()
    live = (traffic.first_answer_by(2) or 0) - since
    print(f"swap: sequence 2 answered {live:.1f} s after its import; "
          f"{len(traffic.answers)} chat answers, {len(traffic.failures)} failed; "
          f"RSS steady {steady:.0f} MiB, peak {peak[0]:.0f} MiB during the swap")
    assert traffic.failures == []
    assert report(server.root, 2)["passed"]
    card = traffic.client.models.retrieve(CHAT)
    assert (card.model_extra or {}).get("sequence") == 2
    settle(server.root)
    assert Store(Layout(server.root)).last_good("demo") == 2


def test_sequence_failing_its_self_test_is_never_served(server: Server, tmp_path: Path,
                                                        demo_bundles: tuple[Path, Path]) -> None:
    bad = failing_copy(server.root, demo_bundles[0] / "k.key", 3, tmp_path)
    with Traffic(server) as traffic:
        imported = run_tool("ctl", server.root, "bundle", "import", str(bad))
        assert imported.returncode == 0, imported.stderr
        failed = wait_for("the self-test of 3", lambda: report(server.root, 3))
        assert not failed["passed"]
        chat = next(c for c in failed["checks"] if c["model"] == CHAT)
        assert "lacks ['Zanzibar']" in chat["detail"]
        status = json.loads(run_tool("ctl", server.root, "status", "--json").stdout)
        demo = status["bundles"][0]
        assert (demo["active"], demo["serving"], demo["mismatch"]) == (3, 2, True)
        assert "back to 2" in settle(server.root)
        time.sleep(2)
    assert traffic.failures == []
    assert not any(f.endswith("-demo-3") for _, f in traffic.answers)
    store = Store(Layout(server.root))
    assert (store.active("demo"), store.bad("demo"), store.last_good("demo")) == (2, [3], 2)
    audit = [e["event"] for e in Layout(server.root).audit.entries()]
    assert audit[-2:] == ["import", "trial-fail"]
    text = run_tool("ctl", server.root, "status").stdout
    assert "bad [3]" in text and "self-test of 3: FAILED" in text and "Zanzibar" in text
