"""The pure-ASGI layers of `invdiff serve` around its FastAPI app (app.py puts them in order), and
how a JSON decode error is told to the caller.

    StampResponses   outermost: every response carries X-Served-By and is counted in
                     invdiff_requests_total by its status (the probes' and scrapes' own GETs aside)
    ShedWhenFull     (app.py) 429 while the queue is full, before the body is read
    BoundedBody      413 for a body past MAX_BODY_BYTES, from Content-Length before anything is
                     read, or while it streams; 415 for a POST /v1/images that is not JSON

Each answers with the service's usual JSON error body, {"detail": "..."}, and costs a refused
request a few microseconds and at most MAX_BODY_BYTES of memory: no parsing, no validation.
Free of FastAPI and Starlette: only the ASGI messages.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable, List, Optional, Tuple

from .metrics import Metrics
from .settings import MAX_BODY_BYTES

log = logging.getLogger("invdiff.serve")

# GETs of these are liveness and readiness probes and Prometheus scrapes, not requests for images:
# invdiff_requests_total leaves them out (a probe every second would drown the requests), while
# any other method on them (a 405) and every other path (a 404) is counted.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


async def send_json_error(send, status: int, message: str, retry_after: Optional[int] = None) -> None:
    """Answer with `status` and the service's JSON error body, {"detail": message}."""
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> Optional[bytes]:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class StampResponses:
    """Outermost layer: adds X-Served-By to every response, errors included, and counts it in
    invdiff_requests_total{status} (GETs of PROBE_PATHS aside), so that a response the app's own
    handlers never see (Starlette's 404 and 405, FastAPI's 400, a middleware's 413, 415 or 429)
    is counted like the others. An exception that escapes the app becomes a JSON 500, counted
    and stamped too, and is logged with its traceback."""

    def __init__(self, app, metrics: Metrics, served_by: str):
        self.app, self.metrics, self.served_by = app, metrics, served_by.encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = not (scope["method"] in ("GET", "HEAD") and scope["path"] in PROBE_PATHS)
        started = False

        async def stamped(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-served-by", self.served_by)]}
                if counted:
                    self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, stamped)
        except Exception as exc:
            if started:  # the status is out already: the server can only cut the response short
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            await send_json_error(stamped, 500, f"internal error: {type(exc).__name__}")


class BoundedBody:
    """Refuses a body the service will not read, before it is parsed:

    - 413 when Content-Length says it is over `limit` bytes, before any of it is read (the
      server discards the rest as it arrives), on every path;
    - on POST to `json_paths`: 415 unless the Content-Type is application/json, then the body is
      read here, at most `limit` bytes of it: 413 as soon as a body without a Content-Length
      (chunked) passes the limit. A body within it is handed on to the app whole; the next
      receive() is the server's again (the app learns of a client's disconnect from it)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, json_paths: Iterable[str] = ("/v1/images",)):
        self.app, self.limit, self.json_paths = app, limit, frozenset(json_paths)

    def _too_large(self, size: Optional[int] = None) -> str:
        said = f"is {size} bytes" if size is not None else "passed the limit while it was sent"
        return (f"the request body {said}; the service reads at most {self.limit} bytes "
                f"(a sampling request is a few hundred)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.limit:
            await send_json_error(send, 413, self._too_large(int(length)))
            return
        if scope["method"] != "POST" or scope["path"] not in self.json_paths:
            await self.app(scope, receive, send)
            return
        content_type = _header(scope, b"content-type")
        media_type = (content_type or b"").split(b";")[0].strip().lower()
        if media_type != b"application/json":
            given = f"got {content_type.decode('latin-1')!r}" if content_type is not None else "none was given"
            await send_json_error(send, 415, f"the request body must be JSON, with Content-Type: application/json; {given}")
            return
        chunks: List[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was sent: no one to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_json_error(send, 413, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)


# --------------------------------------------------------------------- JSON decode errors
def field_at(doc: str, pos: int) -> Optional[str]:
    """The field whose value is being read at character `pos` of the JSON text `doc` (where a
    decode error stopped), as a dotted path ("num", "a.b", "list.2"), or None where no field can
    be named (at the top level, at a key, after a comma). Scans doc[:pos] only."""
    frames: List[List[Any]] = []  # [kind, key or index]: kind "{" (key None until `"key":`) or "["
    i, end = 0, min(pos, len(doc))
    while i < end:
        c = doc[i]
        if c == '"':
            j = i + 1
            while j < end and doc[j] != '"':
                j += 2 if doc[j] == "\\" else 1
            if j >= end:  # the error is inside this string
                break
            k = j + 1
            while k < end and doc[k] in " \t\r\n":
                k += 1
            if k < end and doc[k] == ":" and frames and frames[-1][0] == "{":
                try:
                    frames[-1][1] = json.loads(doc[i:j + 1])
                except ValueError:
                    frames[-1][1] = doc[i + 1:j]
                i = k
            else:
                i = j
        elif c in "{[":
            frames.append([c, None if c == "{" else 0])
        elif c in "}]":
            if frames:
                frames.pop()
        elif c == "," and frames:
            if frames[-1][0] == "{":
                frames[-1][1] = None
            else:
                frames[-1][1] += 1
        i += 1
    path: List[str] = []
    for _, key in frames:
        if key is None:
            break
        path.append(str(key))
    return ".".join(path) or None


def json_error_message(doc: Any, pos: Any, reason: str) -> str:
    """One line for a body that is not valid JSON: the field where decoding stopped, or 'the body
    is not valid JSON', with the decoder's reason and the line and column."""
    if not isinstance(doc, str) or not isinstance(pos, int):
        return f"the body is not valid JSON: {reason}"
    error = json.JSONDecodeError(reason, doc, pos)
    joint = " " if reason.endswith(" at") else " at "  # "Unterminated string starting at"
    where = f"{reason}{joint}line {error.lineno}, column {error.colno}"
    field = field_at(doc, pos)
    if field is None:
        return f"the body is not valid JSON: {where}"
    return f"{field}: not valid JSON: {where}"


def validation_problems(errors: Iterable[dict], body: Any) -> List[str]:
    """FastAPI's validation errors as one readable phrase each ("num: Input should be a valid
    integer"), rather than its nested list: the caller reads it and fixes the request."""
    problems = []
    for e in errors:
        loc: Tuple = tuple(e.get("loc", ()))
        if e.get("type") == "json_invalid":
            pos = loc[1] if len(loc) > 1 else None
            problems.append(json_error_message(body, pos, (e.get("ctx") or {}).get("error", e.get("msg", ""))))
        elif loc == ("body",) and e.get("type") == "missing":
            problems.append('the body is empty: send a JSON object such as {"prompt": "..."}')
        else:
            problems.append(f"{'.'.join(str(p) for p in loc[1:]) or 'body'}: {e.get('msg', '')}")
    return problems
