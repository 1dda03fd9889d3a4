"""The API a desktop app holds: cancel a stream from another thread (it stops before its next
token and frees the engine), cancel a blocking call with an Event, and the asyncio interface
answering exactly as the sync one does. On the tiny base: it decodes thousands of tokens a second,
so the answers that must still be running when they are cancelled ask for LONG tokens."""

from __future__ import annotations

import asyncio
import threading

import pytest

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
LONG = 3000   # tokens: most of the tiny engine's context, a second or so of decoding


def test_a_stream_closed_from_another_thread_stops_within_one_token(tiny_engine):
    s = tiny_engine.chat(PROMPT, adapter=None, stream=True, max_tokens=LONG)
    seen, third = [], threading.Event()

    def consume():
        for piece in s:
            seen.append(piece)
            if len(seen) == 3:
                third.set()
                assert closed.wait(30)        # the UI thread closes while we are mid-stream

    closed = threading.Event()
    t = threading.Thread(target=consume)
    t.start()
    assert third.wait(60)
    s.close()                                 # was: ValueError "generator already executing"
    closed.set()
    t.join(60)
    assert not t.is_alive()
    res = s.result
    assert res.finish_reason == "cancelled" and res.completion_tokens <= len(seen) + 1 < LONG
    assert tiny_engine.chat(PROMPT, adapter=None, max_tokens=2).completion_tokens == 2   # the engine is free


def test_a_blocking_call_is_cancelled_by_its_event(tiny_engine):
    cancel = threading.Event()
    cancel.set()
    res = tiny_engine.chat(PROMPT, adapter=None, max_tokens=50, cancel=cancel)
    assert res.finish_reason == "cancelled" and res.completion_tokens == 0


def test_async_interface_answers_as_the_sync_one_does(tiny_engine):
    from edgeft import AsyncEngine

    sync = tiny_engine.chat(PROMPT, adapter=None, max_tokens=24)

    async def main():
        eng = AsyncEngine.wrap(tiny_engine)
        whole = await eng.chat(PROMPT, adapter=None, max_tokens=24)
        stream = eng.stream_chat(PROMPT, adapter=None, max_tokens=24)
        pieces = [p async for p in stream]
        return whole, "".join(pieces), stream.result

    whole, streamed, result = asyncio.run(main())
    assert whole.text == sync.text == streamed and result.completion_tokens == sync.completion_tokens


def test_leaving_an_async_stream_block_early_cancels_the_answer(tiny_engine):
    from edgeft import AsyncEngine

    async def main():
        eng = AsyncEngine.wrap(tiny_engine)
        async with eng.stream_chat(PROMPT, adapter=None, max_tokens=LONG) as stream:
            async for _ in stream:
                break
        return stream.result

    res = asyncio.run(main())
    assert res.finish_reason == "cancelled" and res.completion_tokens < LONG
    assert tiny_engine.chat(PROMPT, adapter=None, max_tokens=2).completion_tokens == 2


def test_return_types_are_precise():
    import typing

    from edgeft.engine import Engine

    hints = typing.get_type_hints(Engine.run)
    assert "Generation" in str(hints["return"]) and "Stream" in str(hints["return"])
    assert typing.get_overloads(Engine.run) and typing.get_overloads(Engine.chat) and typing.get_overloads(Engine.complete)


def test_cancelling_an_awaiting_task_cancels_the_answer(tiny_engine):
    from edgeft import AsyncEngine

    async def main():
        eng = AsyncEngine.wrap(tiny_engine)
        task = asyncio.ensure_future(eng.chat(PROMPT, adapter=None, max_tokens=LONG))
        while not tiny_engine._lock.locked():      # the answer has started on the worker thread
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert tiny_engine.stats.last.finish_reason == "cancelled" and tiny_engine.stats.last.completion_tokens < LONG
    assert tiny_engine.chat(PROMPT, adapter=None, max_tokens=2).completion_tokens == 2
