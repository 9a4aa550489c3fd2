from __future__ import annotations

import threading
import time

from appliance.engines.lanes import CoreLanes


def test_chat_gives_up_a_core_while_an_aux_job_runs() -> None:
    lanes = CoreLanes(cores=2, aux=1)
    assert lanes.chat_threads() == 2
    with lanes.borrow("transcription"):
        assert lanes.chat_threads() == 1 and lanes.borrowed == 1
    assert lanes.chat_threads() == 2


def test_aux_jobs_wait_for_a_lane_instead_of_oversubscribing() -> None:
    lanes = CoreLanes(cores=2, aux=1)
    order: list[str] = []

    def job(name: str) -> None:
        with lanes.borrow(name):
            order.append(f"start {name}")
            time.sleep(0.1)
            assert lanes.borrowed == 1
            order.append(f"end {name}")

    threads = [threading.Thread(target=job, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order[0].startswith("start") and order[1].startswith("end")


def test_single_core_machine() -> None:
    lanes = CoreLanes(cores=1, aux=4)
    with lanes.borrow("embeddings"):
        assert lanes.chat_threads() == 1
