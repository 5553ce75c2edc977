"""Rewards over HTTP for a saved reward model: PPO workers post texts, the server answers their rewards.

Protocol (JSON in and out; every response carries Content-Type: application/json and Content-Length):

    POST /score       {"pairs": [{"prompt": str, "answer": str}, ...]}   or   {"texts": [str, ...]}
                      -> 200 {"rewards": [float, ...]}, one per item, in request order; a multi-attribute
                         model adds "attributes": [{name: float, ...}, ...], one object per item
    POST /get_reward  {"query": [str, ...], "prompts": [str, ...], "labels": [...]}   (OpenRLHF's remote
                      reward model; "prompts" optional, "labels" optional and not used)
                      -> 200 {"rewards": [float, ...], "scores": [float, ...]}, one per query
    GET  /health      -> 200 {"status": "ok", "max_seq_len": N, "max_items": N, "batch_size": N}

Pairs are tokenised exactly as in training (prompt, then answer + end-of-conversation token, the prompt
cut from the left when too long); texts are scored as given, cut from the left to max_seq_len. A query
is a whole conversation as a PPO step decodes its sequence (`Scorer.encode_rendered`: the end-of-sequence
and pad tokens the policy left at its end become the template's end of an assistant turn). A model with a
length calibration (`export.py --length_calibration`) needs each answer's length: it takes pairs, and
queries with their "prompts"; whole texts, or queries without prompts, are a 400. With
`normalize`, every reward is (reward - mean) / std of the held-out rewards training measured. When the
server has a token, every request (/health too) needs `Authorization: Bearer TOKEN` (or HTTP Basic with the
token as password: `http://rm:TOKEN@host:port/get_reward` for OpenRLHF, whose client sends no header). Errors are
`{"error": "one-line message"}` with status 400 (malformed JSON, wrong shape or type, an answer longer
than max_seq_len), 401 (missing or wrong token), 404 (unknown path), 405 (wrong method), 408 (the body
stalled for HANDLER_TIMEOUT_S), 411 (no Content-Length), 413 (a body over max_request_bytes, refused
before it is read, or more than max_items items), 500 (the model call failed), 501 (a method unknown to
HTTP) or 503 (shutting down). Connections are kept alive after a 200 and closed after an error. A client
that sends `Expect: 100-continue` learns of a 401, 404, 405, 411 or 413 before sending its body; one that
sends a large body regardless may see the connection closed under it instead of the 413.

Why batching: PPO workers each send a few sequences at a time, and one model call on a batch costs about
as much as one on a single sequence. Handler threads tokenise their request and queue it; one batcher
thread, the only one that touches the model, takes what is queued, waits up to batch_wait_ms for more
(until it holds BATCH_FACTOR * batch_size sequences), scores everything in one `Scorer.score_all` call
and hands each request its own rewards. A failed model call fails the requests of that batch only.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
from rlhf_reward.utils.data.fields import describe
from rlhf_reward.utils.errors import UserError, first_line

from step2_reward_model.scoring import Encoded, Scorer

BATCH_FACTOR = 4  # a model call takes up to this many scorer batches of queued requests
HANDLER_TIMEOUT_S = 30.0  # a client silent this long on its connection is dropped
ROUTES = {"/score": "POST", "/get_reward": "POST", "/health": "GET"}
OPENRLHF_FIELDS = ("query", "prompts", "labels")


def presented_token(authorization: str) -> bytes:
    """The token an Authorization header presents: `Bearer TOKEN`, or HTTP Basic with the token as the
    password (what a client sends for a URL `http://user:TOKEN@host/...`, as OpenRLHF's remote-reward
    client does, which sends no other header)."""
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip().encode("latin-1", "replace")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
        except ValueError:
            return b""
    return b""


class RequestError(Exception):
    """A request refused with an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    return describe(value, json_names=True)


def parse_body(request: object, max_items: int) -> tuple[str, list]:
    """("pairs", [(prompt, answer), ...]) or ("texts", [text, ...]) from a decoded body; a RequestError
    naming the first thing wrong with it."""
    if not isinstance(request, dict):
        raise RequestError(400, f'the body must be a JSON object with "pairs" or "texts", not {json_type(request)}')
    unknown = sorted(set(request) - {"pairs", "texts"})
    if unknown:
        raise RequestError(400, f'unknown field "{unknown[0]}" (expected "pairs" or "texts")')
    if len(request) != 1:
        raise RequestError(400, 'give "pairs" or "texts", not both' if request else 'the body needs "pairs" or "texts"')
    kind, items = next(iter(request.items()))
    if not isinstance(items, list):
        raise RequestError(400, f"{kind} must be an array, not {json_type(items)}")
    if not items:
        raise RequestError(400, f"{kind} is empty")
    if len(items) > max_items:
        raise RequestError(413, f"{len(items)} {kind}, more than the {max_items} allowed per request (max_items)")
    return kind, check_texts(items) if kind == "texts" else check_pairs(items)


def parse_queries(request: object, max_items: int) -> tuple[list[str], list[str] | None]:
    """The queries of an OpenRLHF remote-reward request and their prompts (when sent); a RequestError
    naming the first thing wrong."""
    if not isinstance(request, dict) or "query" not in request:
        raise RequestError(400, 'the body must be a JSON object with "query" (a list of texts)')
    unknown = sorted(set(request) - set(OPENRLHF_FIELDS))
    if unknown:
        raise RequestError(400, f'unknown field "{unknown[0]}" (expected {", ".join(OPENRLHF_FIELDS)})')
    queries = request["query"]
    if not isinstance(queries, list):
        raise RequestError(400, f"query must be an array, not {json_type(queries)}")
    if not queries:
        raise RequestError(400, "query is empty")
    if len(queries) > max_items:
        raise RequestError(413, f"{len(queries)} queries, more than the {max_items} allowed per request (max_items)")
    prompts = request.get("prompts")
    if prompts is not None and (not isinstance(prompts, list) or len(prompts) != len(queries)):
        raise RequestError(400, f"prompts must be an array of one text per query ({len(queries)})")
    return check_texts(queries, "query"), None if prompts is None else check_texts(prompts, "prompts")


def check_texts(items: list, name: str = "texts") -> list[str]:
    for index, text in enumerate(items):
        if not isinstance(text, str):
            raise RequestError(400, f"{name}[{index}] must be a string, not {json_type(text)}")
    return items


def check_pairs(items: list) -> list[tuple[str, str]]:
    for index, pair in enumerate(items):
        if not isinstance(pair, dict):
            raise RequestError(400, f'pairs[{index}] must be an object with "prompt" and "answer", '
                                    f"not {json_type(pair)}")
        for key in ("prompt", "answer"):
            if key not in pair:
                raise RequestError(400, f'pairs[{index}] has no "{key}"')
            if not isinstance(pair[key], str):
                raise RequestError(400, f"pairs[{index}].{key} must be a string, not {json_type(pair[key])}")
        unknown = sorted(set(pair) - {"prompt", "answer"})
        if unknown:
            raise RequestError(400, f'pairs[{index}] has an unknown field "{unknown[0]}"')
    return [(pair["prompt"], pair["answer"]) for pair in items]


@dataclass
class _Job:
    """One request's sequences, waiting in the queue for the batcher."""

    sequences: list[np.ndarray]
    answer_lengths: np.ndarray | None = None
    done: threading.Event = field(default_factory=threading.Event)
    rewards: list[float] = field(default_factory=list)
    attributes: np.ndarray | None = None
    error: str | None = None


class Batcher:
    """The one thread that calls the model, merging queued requests into few `score_all` calls."""

    def __init__(self, scorer: Scorer, wait_s: float, max_sequences: int) -> None:
        self.scorer, self.wait_s, self.max_sequences = scorer, wait_s, max_sequences
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._thread.start()

    def score(self, encoded: Encoded) -> _Job:
        """The rewards (and attribute scores) of the encoded items, scored together with whatever else is
        queued meanwhile."""
        job = _Job(*encoded)
        with self._lock:  # nothing is queued after stop()'s end marker, so every job gets an answer
            if self._stopped:
                raise RequestError(503, "the server is shutting down")
            self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise RequestError(500, job.error)
        return job

    def stop(self) -> None:
        """Score what is already queued, then end the thread."""
        with self._lock:
            self._stopped = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is None:
                return
            batch, count = [job], len(job.sequences)
            deadline = time.monotonic() + self.wait_s
            while count < self.max_sequences:
                remaining = deadline - time.monotonic()
                try:  # past the deadline, still take what is already queued
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
                count += len(job.sequences)
            self._score(batch)

    def _score(self, batch: list[_Job]) -> None:
        try:
            lengths = [job.answer_lengths for job in batch]
            rewards, attributes = self.scorer.score_all(Encoded(
                [sequence for job in batch for sequence in job.sequences],
                None if any(part is None for part in lengths) else np.concatenate(lengths)))
        except Exception as err:  # fail this batch's requests, keep the thread for the next ones
            for job in batch:
                job.error = f"scoring failed: {type(err).__name__}: {first_line(err)}"
                job.done.set()
            return
        start = 0
        for job in batch:
            job.rewards = rewards[start:start + len(job.sequences)].tolist()
            job.attributes = attributes[start:start + len(job.sequences)]
            start += len(job.sequences)
            job.done.set()


class _Handler(BaseHTTPRequestHandler):
    """One connection: checks a request, has its items scored and writes the JSON answer."""

    protocol_version = "HTTP/1.1"  # keep-alive: a PPO worker reuses its connection
    default_request_version = "HTTP/1.1"  # answer a garbage request line with headers too, not as to HTTP/0.9
    timeout = HANDLER_TIMEOUT_S
    server: RewardServer

    def handle_expect_100(self) -> bool:
        """With `Expect: 100-continue`, refuse a request (token, path, size) before its body is sent."""
        try:
            self._check_headers()
        except RequestError as err:
            self._send_json(err.status, {"error": err.message}, err.headers)
            return False
        return super().handle_expect_100()

    def _handle(self) -> None:
        self._body_read = False
        headers: dict[str, str] = {}
        try:
            status, payload = 200, self._reply()
        except RequestError as err:
            status, payload, headers = err.status, {"error": err.message}, err.headers
        except TimeoutError:
            status, payload = 408, {"error": f"the body did not arrive within {self.timeout:g} s"}
        except ConnectionError:
            raise  # the client has gone, there is no one to answer: the server logs it
        except Exception as err:  # a bug must not take the server down: answer 500, keep serving
            status, payload = 500, {"error": f"internal error: {type(err).__name__}: {first_line(err)}"}
        self._send_json(status, payload, headers)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, unknown method, ...) as JSON too."""
        self._send_json(code, {"error": message or HTTPStatus(code).phrase})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Nothing here: `_send_json` logs each request once, with its error message."""

    def log_error(self, format: str, *args: object) -> None:
        """Nothing: http.server calls this for a connection that idled past the timeout, which is routine
        for a kept-alive one (its own error replies go through `send_error`)."""

    def _reply(self) -> dict:
        path = self._check_headers()
        if path == "/health":
            scorer = self.server.scorer
            return {"status": "ok", "max_seq_len": scorer.max_seq_len, "max_items": self.server.max_items,
                    "batch_size": scorer.batch_size}
        if path == "/get_reward":
            rewards = self._rewards("query", *parse_queries(self._read_json(), self.server.max_items)).rewards
            return {"rewards": rewards, "scores": rewards}
        return self._score(self._read_json())

    def _check_headers(self) -> str:
        """The route, once token, path, method and body size are right (none of the body is read)."""
        token = self.server.token
        if token is not None and not hmac.compare_digest(presented_token(self.headers.get("Authorization", "")), token):
            raise RequestError(401, "this server needs an 'Authorization: Bearer TOKEN' header with its token",
                               {"WWW-Authenticate": "Bearer"})
        path = urlsplit(self.path).path
        if path not in ROUTES:
            raise RequestError(404, f"no such path {path!r} (the server has POST /score, POST /get_reward and "
                                    "GET /health)")
        if self.command != ROUTES[path]:
            raise RequestError(405, f"{path} takes {ROUTES[path]}, not {self.command}", {"Allow": ROUTES[path]})
        if ROUTES[path] == "POST":
            self._content_length()
        return path

    def _content_length(self) -> int:
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "send the body with a Content-Length, not a Transfer-Encoding")
        value = self.headers.get("Content-Length")
        if value is None:
            raise RequestError(411, "a Content-Length header is required")
        value = value.strip()
        if not (value.isascii() and value.isdigit()):
            raise RequestError(400, f"Content-Length {value[:40]!r} is not a number of bytes")
        length = int(value)
        if length > self.server.max_request_bytes:
            raise RequestError(413, f"a body of {length} bytes is over the limit of {self.server.max_request_bytes} "
                                    "(max_request_bytes)")
        return length

    def _read_json(self) -> object:
        length = self._content_length()
        body = self.rfile.read(length)
        if len(body) < length:
            raise RequestError(400, f"the body ended after {len(body)} of its {length} bytes")
        self._body_read = True
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise RequestError(400, f"the body is not valid JSON: {first_line(err, 200)}") from None

    def _score(self, request: object) -> dict:
        kind, items = parse_body(request, self.server.max_items)
        job = self._rewards(kind, items)
        names = self.server.scorer.attribute_names
        if not names:
            return {"rewards": job.rewards}
        return {"rewards": job.rewards,
                "attributes": [dict(zip(names, row, strict=True)) for row in job.attributes.tolist()]}

    def _rewards(self, kind: str, items: list, prompts: list[str] | None = None) -> _Job:
        """Tokenise the items of one kind ("pairs", "texts" or "query", with the queries' prompts) and score
        them with whatever else is queued; the rewards normalised when the server normalises."""
        scorer = self.server.scorer
        with self.server.encode_lock:  # a fast tokenizer fails ("Already borrowed") when called concurrently
            try:
                if kind == "pairs":
                    encoded = scorer.encode_pairs([prompt for prompt, _ in items], [answer for _, answer in items])
                elif kind == "texts":
                    encoded = scorer.encode_texts(items)
                else:
                    # the prompts say where each answer starts, which only a length calibration needs
                    encoded = scorer.encode_rendered(items, prompts if scorer.length_calibration else None)
                scorer.check_lengths(encoded)
            except UserError as err:
                raise RequestError(400, f"{kind}: {err}") from None
        empty = [index for index, sequence in enumerate(encoded.sequences) if not len(sequence)]
        if empty:
            raise RequestError(400, f"{kind}[{empty[0]}] has no tokens to score")
        job = self.server.batcher.score(encoded)
        if not all(math.isfinite(reward) for reward in job.rewards) or not np.isfinite(job.attributes).all():
            raise RequestError(500, "the model returned a reward that is not a finite number")
        if self.server.normalize is not None:
            mean, std = self.server.normalize
            job.rewards = [(reward - mean) / std for reward in job.rewards]
        return job

    def _body_unread(self) -> bool:
        declared = self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers
        return declared and not self._body_read

    def _send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        """Write the response; after an error or an unread body the connection is closed."""
        body = json.dumps(payload).encode()
        if status != 200 or self._body_unread():
            self.close_connection = True
        note = f" ({payload['error']})" if "error" in payload else ""
        self.log_message("%s %d%s", self.requestline[:200], status, note)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client has gone
            self.close_connection = True


class RewardServer(ThreadingHTTPServer):
    """The scoring server: a thread per connection, one batcher thread for the model."""

    daemon_threads = True  # an idle keep-alive connection does not hold up shutdown
    request_queue_size = 128  # listen backlog: many PPO workers may connect at once (socketserver's is 5)

    def __init__(self, scorer: Scorer, host: str, port: int, token: str | None, max_request_bytes: int,
                 max_items: int, batch_wait_ms: float, normalize: tuple[float, float] | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.scorer, self.max_request_bytes, self.max_items = scorer, max_request_bytes, max_items
        self.normalize = normalize
        self.token = None if token is None else token.encode()
        self.encode_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._serving = self._closed = False
        super().__init__((host, port), _Handler)
        self.batcher = Batcher(scorer, batch_wait_ms / 1000, BATCH_FACTOR * scorer.batch_size)

    def handle_error(self, request: socket.socket, client_address: tuple) -> None:
        """One line, not socketserver's traceback, for a connection lost outside a reply (the client reset it)."""
        error = sys.exc_info()[1]
        sys.stderr.write(f"{client_address[0]} - connection lost: {type(error).__name__}: {first_line(error)}\n")

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until `shutdown()` (at once if it came first)."""
        with self._state_lock:
            if self._closed:
                return
            self._serving = True
        super().serve_forever(poll_interval)

    def shutdown(self) -> None:
        """Stop serving, answer the requests already queued for the model, close the socket."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        if self._serving:  # the base class waits for serve_forever's loop, forever if none runs
            super().shutdown()
        self.batcher.stop()
        self.server_close()


def make_server(scorer: Scorer, host: str, port: int, token: str | None = None, max_request_bytes: int = 4 << 20,
                max_items: int = 256, batch_wait_ms: float = 5.0,
                normalize: tuple[float, float] | None = None) -> RewardServer:
    """A bound, listening server with its batcher running; call `serve_forever()` (port 0: any free port,
    see `.server_address`). `normalize`: the (mean, std) every reward is normalised by."""
    if token is not None and not token:
        raise UserError("--token is empty (leave it and RW_EVAL_TOKEN unset to serve without one)")
    if max_request_bytes < 1 or max_items < 1:
        raise UserError("--max_request_bytes and --max_items must be at least 1")
    if not 0 <= batch_wait_ms < math.inf:
        raise UserError(f"--batch_wait_ms {batch_wait_ms}: must be a number of milliseconds, 0 or more")
    try:
        return RewardServer(scorer, host, port, token, max_request_bytes, max_items, batch_wait_ms, normalize)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or first_line(err)}") from None


@contextmanager
def in_thread(server: RewardServer) -> Iterator[int]:
    """Serve from a thread for the length of the block (for tests and benchmarks), then shut down;
    gives the port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError("the server's thread did not stop within 10 s of shutdown")


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived."""


def serve(scorer: Scorer, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_request_bytes: int = 4 << 20, max_items: int = 256, batch_wait_ms: float = 5.0,
          normalize: tuple[float, float] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly and return. Call it from the main thread
    (it installs the signal handlers); a second signal acts as it would without them."""
    server = make_server(scorer, host, port, token, max_request_bytes, max_items, batch_wait_ms, normalize)
    previous: dict[int, object] = {}

    def interrupt(signum: int, frame: object) -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)
        raise _Interrupted

    thread = threading.Thread(target=server.serve_forever, name="reward-server", daemon=True)
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, interrupt)
        thread.start()
        bound_host, bound_port = server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"serving rewards on http://{shown}:{bound_port} (POST /score, POST /get_reward)", flush=True)
        thread.join()  # the signal handler's exception lands here
    except _Interrupted:
        pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        server.shutdown()
