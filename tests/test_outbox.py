"""Engine-to-event-loop hand-off: one wake-up of the loop per engine step, events in order."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from appliance.engines.chat import Finish, Outbox, Stream, TokenEvent


def test_one_wake_up_per_step_and_order_kept() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    wakeups: list[Any] = []
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any) -> Any:
        if callback.__name__ == "_hand_over":
            wakeups.append(callback)
        return original(callback, *args)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        streams = [Stream(loop) for _ in range(8)]
        outbox = Outbox()
        for step in range(3):  # three engine steps of one token for each of 8 sequences
            for stream in streams:
                outbox.put(stream, TokenEvent(f"{step}", step, None, None))
                if step == 2:
                    outbox.put(stream, Finish("length", 5, 3))
            outbox.flush()
        assert len(wakeups) == 3  # not 8 x 3 + 8

        async def drain(stream: Stream) -> list[str]:
            out = []
            while True:
                event = await stream.get()
                if isinstance(event, Finish):
                    return [*out, event.reason]
                out.append(event.text)

        for stream in streams:
            got = asyncio.run_coroutine_threadsafe(drain(stream), loop).result(timeout=5)
            assert got == ["0", "1", "2", "length"]
        outbox.flush()  # nothing held: no wake-up
        assert len(wakeups) == 3
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def test_streams_without_a_loop_get_events_at_once() -> None:
    stream, outbox = Stream(), Outbox()
    outbox.put(stream, TokenEvent("a", 1, None, None))
    assert stream.get_sync(timeout=1).text == "a"  # type: ignore[union-attr]


def test_closed_loop_cancels_its_streams() -> None:
    loop = asyncio.new_event_loop()
    stream, outbox = Stream(loop), Outbox()
    loop.close()
    outbox.put(stream, TokenEvent("a", 1, None, None))
    outbox.flush()
    assert stream.cancelled
