"""OpenAI response bodies for a finished Generation: a JSON completion, or server-sent event chunks
fed from a job's events (each stream ends with `data: [DONE]`)."""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable

from starlette.responses import StreamingResponse

from .requests import GenRequest
from .scheduler import Job


def _ext(job: Job, gen) -> dict:
    return {"adapters": gen.adapters, "reused_prefix": gen.reused_prefix, "batch_size": gen.batch_size,
            "ttft_ms": round(gen.ttft_ms, 2),
            "decode_tps": round(gen.decode_tps, 1), "queue_ms": round((job.started - job.enqueued) * 1e3, 2)}


def _usage(gen) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _result(kind: str, rid: str, created: int, req: GenRequest, job: Job, gen) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text, "refusal": None},
                  "logprobs": None, "finish_reason": gen.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": gen.text, "logprobs": None, "finish_reason": gen.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
            "usage": _usage(gen), "system_fingerprint": None, "edgeft": _ext(job, gen)}


async def _sse(kind: str, rid: str, created: int, req: GenRequest, job: Job) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: dict | None, finish: str | None = None, **extra) -> bytes:
        if kind == "chat":
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]
        else:
            choices = [] if delta is None else [{"index": 0, "text": delta.get("content", ""),
                                                 "logprobs": None, "finish_reason": finish}]
        d = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices, **extra}
        return b"data: " + json.dumps(d, ensure_ascii=False).encode() + b"\n\n"

    if kind == "chat":
        yield chunk({"role": "assistant", "content": ""})
    while True:
        ev, payload = await job.events.get()
        if ev == "piece":
            yield chunk({"content": payload})
        elif ev == "done":
            yield chunk({}, payload.finish_reason)
            if req.include_usage:
                yield chunk(None, usage=_usage(payload), edgeft=_ext(job, payload))
            break
        elif ev == "error":
            yield b"data: " + json.dumps(payload.body()).encode() + b"\n\n"
            break
    yield b"data: [DONE]\n\n"


class _SSEResponse(StreamingResponse):
    """Server-sent events that cancel their job however the response ends (done, error, disconnect)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
