"""The scoring server: its rewards equal offline scoring, concurrent requests share model calls, every
bad request gets its status and a one-line JSON error without harming the server, and
`rw_eval.py --serve` starts, answers and stops on SIGTERM as a user runs it."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from conftest import REPO_ROOT, rounding_tolerance
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.runtime import free_port

from step2_reward_model.output import load_manifest, load_reward_model, load_scoring_tokenizer
from step2_reward_model.scoring import Scorer
from step2_reward_model.server import in_thread, make_server

TOKEN = "s3cret-token"
PAIRS = [("Human: What is a compiler? Assistant: ", "A program that translates source code into machine code."),
         ("Human: Hi. Assistant: ", "Hello."),
         ("Human: Why is the sky blue? " * 12 + "Assistant: ", "Air scatters blue light more than red light."),
         ("Human: Name a colour. Assistant: ", "")]
TEXTS = ["Human: What is a compiler? Assistant: A translator of programs.", "short",
         "Human: tell me a long story. " * 40]


@pytest.fixture(scope="module")
def scorer(saved_models) -> Scorer:
    path = saved_models["opt"]
    manifest = load_manifest(path)
    return Scorer(load_reward_model(path), load_scoring_tokenizer(path), manifest["max_seq_len"],
                  manifest["end_of_conversation_token"], batch_size=4)


@contextmanager
def running(scorer: Scorer, **options):
    """The port of a server serving from a thread until the block ends."""
    with in_thread(make_server(scorer, "127.0.0.1", 0, **options)) as port:
        yield port


@pytest.fixture(scope="module")
def port(scorer):
    with running(scorer, token=TOKEN, max_request_bytes=64 << 10, max_items=32) as port:
        yield port


def call(port: int, method: str, path: str, body: object = None, token: str | None = TOKEN,
         headers: dict | None = None, connection: http.client.HTTPConnection | None = None):
    """(status, decoded JSON body, headers) of one request; `body` is sent as JSON unless it is bytes."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    try:
        connection.request(method, path, body=data, headers=headers)
        return read(connection.getresponse())
    finally:
        if own:
            connection.close()


def read(response: http.client.HTTPResponse):
    payload = response.read()
    assert response.getheader("Content-Type") == "application/json"
    assert int(response.getheader("Content-Length")) == len(payload)
    return response.status, json.loads(payload), response.headers


def send_raw(port: int, method: str, path: str, headers: dict, body: bytes = b""):
    """A request with exactly these headers (http.client adds no Content-Length), and its response."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        return read(connection.getresponse())
    finally:
        connection.close()


def offline_pairs(scorer: Scorer, pairs: list[tuple[str, str]]) -> list[float]:
    return scorer.score_ids(scorer.encode_pairs([p for p, _ in pairs], [a for _, a in pairs]))


def scored_offline(rewards: list[float]):
    """Served rewards equal offline scoring to float32 rounding (the server batches them differently)."""
    return pytest.approx(rewards, abs=rounding_tolerance(rewards))


def as_json(pairs: list[tuple[str, str]]) -> dict:
    return {"pairs": [{"prompt": prompt, "answer": answer} for prompt, answer in pairs]}


def test_health(port):
    assert call(port, "GET", "/health")[:2] == (200, {"status": "ok", "max_seq_len": 128, "max_items": 32,
                                                      "batch_size": 4})


def test_pairs_score_as_offline_in_request_order(scorer, port):
    expected = offline_pairs(scorer, PAIRS)
    status, body, _ = call(port, "POST", "/score", as_json(PAIRS))
    assert status == 200
    assert body["rewards"] == scored_offline(expected)
    status, body, _ = call(port, "POST", "/score", as_json(PAIRS[::-1]))
    assert body["rewards"] == scored_offline(expected[::-1])
    assert len(set(round(reward, 4) for reward in expected)) == len(PAIRS)  # the order check means something


def test_texts_score_as_offline(scorer, port):
    status, body, _ = call(port, "POST", "/score", {"texts": TEXTS})
    assert status == 200
    assert body["rewards"] == scored_offline(scorer.score_ids(scorer.encode_texts(TEXTS)))


def test_concurrent_requests_are_batched(scorer):
    """16 clients x 4 requests of 1-3 pairs of varied lengths, on kept-alive connections: every answer
    equals offline scoring, and the model ran fewer times than there were requests."""
    requests = [[(f"Human: question {client} {turn}. " * (1 + (client + turn) % 5) + "Assistant: ",
                  "word " * (2 * client + turn) + str(k)) for k in range(1 + (client + turn) % 3)]
                for client in range(16) for turn in range(4)]
    expected = [offline_pairs(scorer, pairs) for pairs in requests]
    calls = []
    counting = dataclasses.replace(scorer)
    counting.score_all = lambda encoded: calls.append(len(encoded.sequences)) or scorer.score_all(encoded)
    answers, start = {}, threading.Barrier(16)

    def client(index: int, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait()
        for turn in range(4):
            number = 4 * index + turn
            answers[number] = call(port, "POST", "/score", as_json(requests[number]), token=None,
                                   connection=connection)[:2]
        connection.close()

    with running(counting, batch_wait_ms=50) as port:
        threads = [threading.Thread(target=client, args=(index, port)) for index in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    for number, rewards in enumerate(expected):
        status, body = answers[number]
        assert status == 200
        assert body["rewards"] == scored_offline(rewards)
    assert sum(calls) == sum(len(pairs) for pairs in requests)
    assert len(calls) < len(requests) / 2, calls


def test_token(port, scorer):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}):
        for method, path in (("POST", "/score"), ("GET", "/health")):
            status, body, response_headers = call(port, method, path, as_json(PAIRS[:1]) if method == "POST" else None,
                                                  token=None, headers=headers)
            assert status == 401, headers
            assert response_headers["WWW-Authenticate"] == "Bearer"
            assert "Authorization: Bearer TOKEN" in body["error"] and TOKEN not in body["error"]
    assert call(port, "POST", "/score", as_json(PAIRS[:1]), token=None,
                headers={"Authorization": f"bearer {TOKEN}"})[0] == 200
    with running(scorer) as open_port:  # a server without a token needs no header
        assert call(open_port, "GET", "/health", token=None)[0] == 200


def test_oversized_body_refused_without_reading_it(port):
    started = time.monotonic()
    status, body, headers = send_raw(port, "POST", "/score", {"Authorization": f"Bearer {TOKEN}",
                                                              "Content-Length": str(10 ** 12)}, b"{}")
    assert time.monotonic() - started < 5  # reading the body would wait for the 30 s socket timeout
    assert status == 413 and "max_request_bytes" in body["error"] and headers["Connection"] == "close"
    # a client that asks first (Expect: 100-continue) is refused before sending anything
    status, body, _ = send_raw(port, "POST", "/score", {"Authorization": f"Bearer {TOKEN}",
                                                        "Content-Length": str(1 << 20), "Expect": "100-continue"})
    assert status == 413
    status, body, _ = send_raw(port, "POST", "/score", {"Content-Length": "2", "Expect": "100-continue"})
    assert status == 401


def test_expect_continue_then_score(scorer, port):
    data = json.dumps(as_json(PAIRS[:2])).encode()
    status, body, _ = send_raw(port, "POST", "/score", {"Authorization": f"Bearer {TOKEN}", "Expect": "100-continue",
                                                        "Content-Length": str(len(data))}, data)
    assert status == 200
    assert body["rewards"] == scored_offline(offline_pairs(scorer, PAIRS[:2]))


def test_too_many_items(port):
    status, body, _ = call(port, "POST", "/score", {"texts": ["a"] * 33})
    assert status == 413 and body["error"] == "33 texts, more than the 32 allowed per request (max_items)"


def test_length_required(port):
    status, body, _ = send_raw(port, "POST", "/score", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 411 and "Content-Length" in body["error"]
    status, body, _ = send_raw(port, "POST", "/score", {"Authorization": f"Bearer {TOKEN}",
                                                        "Transfer-Encoding": "chunked"}, b"2\r\n{}\r\n0\r\n\r\n")
    assert status == 411
    status, body, _ = send_raw(port, "POST", "/score", {"Authorization": f"Bearer {TOKEN}", "Content-Length": "-1"})
    assert status == 400 and "Content-Length '-1'" in body["error"]


GOOD = {"prompt": "Human: hi Assistant: ", "answer": "hello"}


@pytest.mark.parametrize("body, message", [
    (b"{not json", "the body is not valid JSON: Expecting property name enclosed in double quotes"),
    (b"\xff\xfe\x00", "the body is not valid JSON"),
    (b"[" * 50000, "the body is not valid JSON"),
    (b"", "the body is not valid JSON"),
    ([GOOD], 'the body must be a JSON object with "pairs" or "texts", not an array'),
    ({}, 'the body needs "pairs" or "texts"'),
    ({"pairs": [GOOD], "texts": ["a"]}, 'give "pairs" or "texts", not both'),
    ({"pair": [GOOD]}, 'unknown field "pair" (expected "pairs" or "texts")'),
    ({"pairs": "hello"}, "pairs must be an array, not a string"),
    ({"texts": []}, "texts is empty"),
    ({"pairs": [GOOD, GOOD, GOOD, {"prompt": "p", "answer": 3}]}, "pairs[3].answer must be a string, not a number"),
    ({"pairs": [GOOD, {"prompt": None, "answer": "a"}]}, "pairs[1].prompt must be a string, not null"),
    ({"pairs": [GOOD, "hello"]}, 'pairs[1] must be an object with "prompt" and "answer", not a string'),
    ({"pairs": [{"prompt": "p"}]}, 'pairs[0] has no "answer"'),
    ({"pairs": [{**GOOD, "score": 1}]}, 'pairs[0] has an unknown field "score"'),
    ({"texts": ["a", True]}, "texts[1] must be a string, not a boolean"),
])
def test_bad_body(port, body, message):
    status, answer, headers = call(port, "POST", "/score", body)
    assert status == 400 and answer["error"].startswith(message) and "\n" not in answer["error"]
    assert headers["Connection"] == "close"


def test_answer_too_long_names_the_item(port):
    status, body, _ = call(port, "POST", "/score", {"pairs": [GOOD, {"prompt": "p", "answer": "word " * 300}]})
    assert status == 400
    assert body["error"].startswith("pairs: item 1: the answer is ") and "max_seq_len 128" in body["error"]


def test_empty_text_refused(saved_models):
    """GPT-2's tokenizer adds no BOS, so "" has no token to score (OPT's would score its `</s>`)."""
    path = saved_models["gpt2"]
    manifest = load_manifest(path)
    gpt2 = Scorer(load_reward_model(path), load_scoring_tokenizer(path), 128, manifest["end_of_conversation_token"])
    with running(gpt2) as port:
        status, body, _ = call(port, "POST", "/score", {"texts": ["hello", ""]}, token=None)
    assert (status, body) == (400, {"error": "texts[1] has no tokens to score"})


def test_unknown_path_and_wrong_method(port):
    status, body, _ = call(port, "GET", "/nowhere?x=1")
    assert status == 404 and "'/nowhere'" in body["error"]
    for method, path, allowed in (("GET", "/score", "POST"), ("PUT", "/score", "POST"), ("POST", "/health", "GET"),
                                  ("DELETE", "/health", "GET")):
        status, body, headers = call(port, method, path, b"{}" if method != "GET" else None)
        assert status == 405 and headers["Allow"] == allowed
        assert body["error"] == f"{path} takes {allowed}, not {method}"
    assert call(port, "BREW", "/score")[0] == 501


def test_garbage_request_line(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 hello there\r\n\r\n")
        reply = sock.makefile("rb").read()
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Content-Type: application/json" in head
    assert "error" in json.loads(payload)


def test_model_failure_fails_its_batch_only(scorer):
    failures = [RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")]
    failing = dataclasses.replace(scorer)

    def score_all(sequences):
        if failures:
            raise failures.pop()
        return scorer.score_all(sequences)

    failing.score_all = score_all
    with running(failing) as port:
        status, body, _ = call(port, "POST", "/score", {"texts": TEXTS}, token=None)
        assert (status, body) == (500, {"error": "scoring failed: RuntimeError: CUDA out of memory."})
        status, body, _ = call(port, "POST", "/score", {"texts": TEXTS}, token=None)
        assert status == 200 and len(body["rewards"]) == len(TEXTS)


def test_make_server_checks_its_arguments(scorer, port):
    for options, message in (({"token": ""}, "--token is empty"), ({"max_items": 0}, "at least 1"),
                             ({"batch_wait_ms": -1}, "--batch_wait_ms -1")):
        with pytest.raises(UserError, match=message):
            make_server(scorer, "127.0.0.1", 0, **options)
    with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
        make_server(scorer, "127.0.0.1", port)
    server = make_server(scorer, "127.0.0.1", 0)  # shut down before it ever served: returns at once
    server.shutdown()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.server_address, timeout=5)


def send_cut_body(port: int, reset: bool) -> tuple[int, dict] | None:
    """A /score request whose body stops after 20 of its declared 200 bytes. Then either half-close and return
    (status, body) of the reply, or vanish with a TCP reset while the server waits for the rest (None)."""
    head = f"POST /score HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 200\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"texts": ["cut shor')
        if reset:
            time.sleep(0.2)  # time for the handler to start waiting for the rest
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return None
        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").read()
    head_bytes, _, payload = reply.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), json.loads(payload)


def test_still_serving_after_bad_requests(scorer):
    """A server of its own gets a run of bad requests, each answered with its own status and error (a client that
    resets mid-body gets none), and then still scores a good request as offline scoring does."""
    refused = [  # (request, status, start of the error); sent with the token unless the token is what is wrong
        (lambda port: call(port, "POST", "/score", b"{not json"), 400, "the body is not valid JSON"),
        (lambda port: call(port, "POST", "/score", {"pair": [GOOD]}), 400, 'unknown field "pair"'),
        (lambda port: call(port, "POST", "/score", {"texts": ["a", 3]}), 400, "texts[1] must be a string"),
        (lambda port: call(port, "POST", "/score", {"texts": ["a"] * 5}), 413, "5 texts, more than the 4 allowed"),
        (lambda port: call(port, "POST", "/score", {"pairs": [{"prompt": "p", "answer": "word " * 300}]}), 400,
         "pairs: item 0: the answer is"),
        (lambda port: send_raw(port, "POST", "/score", {"Authorization": f"Bearer {TOKEN}",
                                                        "Content-Length": str(5 << 10)}), 413,
         "a body of 5120 bytes is over the limit of 4096"),
        (lambda port: call(port, "POST", "/score", as_json(PAIRS), token=None), 401, "this server needs"),
        (lambda port: call(port, "POST", "/score", as_json(PAIRS), token="wrong"), 401, "this server needs"),
        (lambda port: send_cut_body(port, reset=False), 400, "the body ended after 20 of its 200 bytes"),
    ]
    with running(scorer, token=TOKEN, max_request_bytes=4 << 10, max_items=4) as port:
        for request, status, message in refused:
            answer_status, answer = request(port)[:2]
            assert answer_status == status and answer["error"].startswith(message), (status, message, answer)
        send_cut_body(port, reset=True)  # nothing to read back: the request below shows the server outlived it
        status, body, _ = call(port, "POST", "/score", as_json(PAIRS))
    assert status == 200 and body["rewards"] == scored_offline(offline_pairs(scorer, PAIRS))


def test_rw_eval_serve(saved_models, scorer, tmp_path):
    """As a user runs it: starts, says where it listens, wants the token, scores, exits 0 on SIGTERM."""
    port = free_port()
    with open(tmp_path / "stderr.log", "w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "rw_eval.py", "--model_path", saved_models["opt"], "--serve", "--port", str(port),
             "--token", TOKEN], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        try:
            lines: queue.Queue[str] = queue.Queue()
            threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
            deadline, line = time.monotonic() + 120, ""
            while not line.startswith("serving rewards on"):  # libraries may print before it
                try:
                    line = lines.get(timeout=1)
                except queue.Empty:
                    if process.poll() is not None or time.monotonic() > deadline:
                        stderr.seek(0)
                        pytest.fail(f"no 'serving rewards on' line (exit code {process.poll()}):\n{stderr.read()}")
            assert line == f"serving rewards on http://127.0.0.1:{port} (POST /score, POST /get_reward)\n"
            assert call(port, "POST", "/score", as_json(PAIRS), token=None)[0] == 401
            status, body, _ = call(port, "POST", "/score", as_json(PAIRS))
            assert status == 200 and body["rewards"] == scored_offline(offline_pairs(scorer, PAIRS))
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
            stderr.seek(0)
            assert TOKEN not in stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
