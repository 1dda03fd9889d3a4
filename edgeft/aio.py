"""`AsyncEngine`: the Engine for event-loop apps (asyncio, and the UI frameworks built on it).

Each call runs on a worker thread, so the event loop never waits on llama.cpp; streams are async
iterators whose pieces cross over with `call_soon_threadsafe`. Leaving a stream's `async with`
block early, or cancelling the task that awaits a call, cancels the answer before its next token. The answers are the
Engine's own: the same prompt path, card, grammar and greedy decoding.

    async with AsyncEngine() as eng:
        print((await eng.run("my card got declined", adapter="routing")).value)
        async for piece in eng.stream_chat([{"role": "user", "content": "Hi!"}]):
            print(piece, end="")
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable

from .engine import Engine
from .generation import Generation, Stream

_DONE = object()


class AsyncEngine:
    """An Engine behind `await`. Construct it with the Engine's arguments, or wrap one with
    `AsyncEngine.wrap(engine)`; `.engine` is the Engine itself for everything else."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.engine = kwargs.pop("_engine", None) or Engine(*args, **kwargs)

    @classmethod
    def wrap(cls, engine: Engine) -> "AsyncEngine":
        return cls(_engine=engine)

    async def load_adapter(self, ref: Any, **kw: Any) -> str:
        return await asyncio.to_thread(self.engine.load_adapter, ref, **kw)

    async def run(self, text: str, **kw: Any) -> Generation:
        """`Engine.run` (a task answer, `.value` parsed by the card) without blocking the loop."""
        return await self._call(self.engine.run, text, **kw)

    async def chat(self, messages: list[dict], **kw: Any) -> Generation:
        return await self._call(self.engine.chat, messages, **kw)

    async def complete(self, prompt: str, **kw: Any) -> Generation:
        return await self._call(self.engine.complete, prompt, **kw)

    async def run_many(self, texts: list[str], **kw: Any) -> list[Generation]:
        """`Engine.run_many` (a bulk job, answers decoded together) without blocking the loop."""
        return await self._call(self.engine.run_many, texts, **kw)

    def stream_run(self, text: str, **kw: Any) -> "AsyncStream":
        return AsyncStream(lambda: self.engine.run(text, stream=True, **kw))

    def stream_chat(self, messages: list[dict], **kw: Any) -> "AsyncStream":
        return AsyncStream(lambda: self.engine.chat(messages, stream=True, **kw))

    def stream_complete(self, prompt: str, **kw: Any) -> "AsyncStream":
        return AsyncStream(lambda: self.engine.complete(prompt, stream=True, **kw))

    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run `fn` on a thread; cancelling the awaiting task cancels the answer too."""
        cancel = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args, cancel=cancel, **kw))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            cancel.set()
            await asyncio.gather(task, return_exceptions=True)   # the engine is free again
            raise

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.close)

    async def __aenter__(self) -> "AsyncEngine":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncStream:
    """Text pieces as an async iterator; `.result` is the Generation once it has ended.

    Use it in `async with` to stop the answer when the block is left early (a `break`, an
    exception, a cancelled task): `async with eng.stream_chat(msgs) as s: async for p in s: ...`.
    `await s.cancel()` stops it from anywhere."""

    def __init__(self, start: Callable[[], Stream]):
        self._start = start
        self._stream: Stream | None = None
        self._gen: AsyncIterator[str] | None = None

    @property
    def result(self) -> Generation | None:
        return self._stream.result if self._stream is not None else None

    def __aiter__(self) -> AsyncIterator[str]:
        if self._gen is None:
            self._gen = self._pieces()
        return self._gen

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.cancel()
        if self._gen is not None:
            await self._gen.aclose()   # waits until the engine is free again

    async def _pieces(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ready = threading.Event()

        def pump() -> None:
            try:
                self._stream = self._start()
                ready.set()
                for piece in self._stream:
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as e:  # handed to the iterating task
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                ready.set()
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = asyncio.ensure_future(asyncio.to_thread(pump))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not worker.done():      # left early or cancelled: stop the answer, free the engine
                await asyncio.to_thread(ready.wait)
                if self._stream is not None:
                    self._stream.cancel()
                await asyncio.gather(worker, return_exceptions=True)

    async def cancel(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
