"""Drive a running `firstrt serve` with OpenAI's own Python client (`openai`, pinned by
scripts/setup-openai-client.sh). tests/server.rs starts the server and runs this script:

    python openai_client.py check SPEC.json   # answers against expectations the Rust test computed
    python openai_client.py load URL MODEL N CONCURRENCY MAX_TOKENS

Prints one JSON line of what it measured; on a failed check, prints FAIL: ... and exits 1.
"""

import concurrent.futures
import json
import sys
import time
import urllib.request

import openai


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def expect(cond, message):
    if not cond:
        fail(message)


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def wait_idle(url, seconds=30.0):
    """Poll /health until no request holds capacity; the last answer."""
    deadline = time.time() + seconds
    while True:
        h = health(url)
        if h["in_flight"] == 0 and h["running"] == 0 and h["waiting"] == 0:
            return h
        if time.time() > deadline:
            fail(f"the server is not idle {seconds} s after the last answer: {h}")
        time.sleep(0.05)


def client(url, api_key=None):
    # No retries: a 429 must reach the test as a 429.
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=300)


def check(spec):
    url, model = spec["url"], spec["model"]
    c = client(url, spec.get("api_key"))
    models = [m.id for m in c.models.list().data]
    expect(models == [model], f"/v1/models lists {models}, expected [{model}]")

    chat = spec["chat"]
    r = c.chat.completions.create(model=model, messages=chat["messages"], temperature=0, max_tokens=chat["max_tokens"])
    text = r.choices[0].message.content
    expect(text == chat["expected_text"], f"chat text {text!r} != firstrt run --chat's {chat['expected_text']!r}")
    expect(r.usage.completion_tokens == chat["expected_completion_tokens"],
           f"usage.completion_tokens {r.usage.completion_tokens} != {chat['expected_completion_tokens']}")
    expect(r.usage.prompt_tokens == chat["expected_prompt_tokens"],
           f"usage.prompt_tokens {r.usage.prompt_tokens} != {chat['expected_prompt_tokens']}")
    expect(r.choices[0].finish_reason == chat["expected_finish"], f"finish_reason {r.choices[0].finish_reason}")
    expect(r.object == "chat.completion" and r.id.startswith("chatcmpl-"), f"object {r.object}, id {r.id}")

    stream = c.chat.completions.create(model=model, messages=chat["messages"], temperature=0, max_tokens=chat["max_tokens"],
                                       stream=True, stream_options={"include_usage": True})
    pieces, roles, finishes, usage, chunks = [], [], [], None, 0
    for chunk in stream:
        chunks += 1
        expect(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object}")
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    streamed = "".join(pieces)
    expect(streamed == text, f"streamed deltas {streamed!r} != the whole answer {text!r}")
    expect(len(pieces) > 1, f"the answer came in {len(pieces)} piece(s): not streamed")
    expect(roles == ["assistant"], f"roles in the deltas: {roles}")
    expect(finishes == [r.choices[0].finish_reason], f"finish reasons in the stream: {finishes}")
    expect(usage is not None and usage.completion_tokens == r.usage.completion_tokens, f"stream usage {usage}")

    # A stop string: the text ends before it, and the finish reason is "stop".
    expect(len(text) > 12, f"the answer {text!r} is too short to test a stop string")
    stop = text[8:12]
    r = c.chat.completions.create(model=model, messages=chat["messages"], temperature=0, max_tokens=chat["max_tokens"], stop=[stop, "\u2603"])
    cut = r.choices[0].message.content
    expect(cut == text[:text.index(stop)] and r.choices[0].finish_reason == "stop", f"stop {stop!r}: {cut!r}, {r.choices[0].finish_reason}")

    # Requests at once, some sharing a plan (batched) and some not: each gets the ids transformers
    # gives for its plan.
    def one(case):
        extra = {"first": {"skip_layers": case["skip_layers"]}, "return_token_ids": True}
        r = c.completions.create(model=model, prompt=case["prompt_ids"], temperature=0, max_tokens=len(case["expected_ids"]),
                                 extra_body=extra)
        return r

    batched_before = health(url)["batched_steps"]
    with concurrent.futures.ThreadPoolExecutor(len(spec["plans"])) as pool:
        results = list(pool.map(one, spec["plans"]))
    batched = health(url)["batched_steps"] - batched_before
    expect(batched > 0, "the requests that share a plan never had a batched decode step")
    for case, r in zip(spec["plans"], results):
        ids = r.choices[0].model_extra["token_ids"]
        expect(ids == case["expected_ids"], f"{case['name']}: ids {ids} != the fixture's {case['expected_ids']}")
        first = r.model_extra["first"]
        expect(first["skipped_layers"] == case["skip_layers"], f"{case['name']}: the response says it skipped {first}")

    # A client that leaves mid-stream frees its sequence.
    idle = wait_idle(url)
    stream = c.chat.completions.create(model=model, messages=chat["messages"], temperature=0.7, max_tokens=500, stream=True)
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()
    after = wait_idle(url)
    expect(after["gpu_bytes"] == idle["gpu_bytes"], f"GPU bytes {after['gpu_bytes']} after a disconnect, {idle['gpu_bytes']} before")
    print(json.dumps({"checked": True, "chat_text": text, "gpu_bytes": after["gpu_bytes"], "batched_steps": batched}))


def load(url, model, total, concurrency, max_tokens):
    c = client(url)
    questions = ["Name a colour.", "What is 2 + 3?", "Say hello.", "Name a fruit.", "What day follows Monday?"]

    def one(i):
        messages = [{"role": "user", "content": questions[i % len(questions)]}]
        t0 = time.time()
        try:
            if i % 3 == 0:
                stream = c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, seed=i, stream=True)
                text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            else:
                r = c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, seed=i)
                text = r.choices[0].message.content
                if r.usage.completion_tokens > max_tokens:
                    return ("bad", f"request {i}: {r.usage.completion_tokens} tokens > max_tokens {max_tokens}")
            return (200, time.time() - t0, text)
        except openai.RateLimitError:
            return (429, time.time() - t0)
        except openai.APIStatusError as e:
            return (e.status_code, time.time() - t0, str(e))
        except Exception as e:  # a dropped connection, a timeout: what must never happen
            return ("error", repr(e))

    # Idle level after a few requests of the same kind (allocators and caches warm).
    for i in range(4):
        one(i)
    idle = wait_idle(url)
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(total)))
    elapsed = time.time() - t0
    statuses = {}
    for r in results:
        statuses[str(r[0])] = statuses.get(str(r[0]), 0) + 1
    bad = [r for r in results if r[0] not in (200, 429, 503)]
    expect(not bad, f"{len(bad)} of {total} requests were not answered with 200, 429 or 503: {bad[:5]}")
    expect(statuses.get("200", 0) > 0, f"no request succeeded: {statuses}")
    after = wait_idle(url)
    expect(after["status"] == "ok", f"/health after the load: {after}")
    expect(after["gpu_bytes"] == idle["gpu_bytes"], f"GPU bytes {after['gpu_bytes']} after the load, {idle['gpu_bytes']} idle before")
    grown = after["rss_bytes"] - idle["rss_bytes"]
    expect(grown <= max(64 << 20, idle["rss_bytes"] // 5),
           f"resident memory grew by {grown >> 20} MiB over the load ({idle['rss_bytes'] >> 20} MiB idle)")
    print(json.dumps({"statuses": statuses, "seconds": round(elapsed, 2), "idle": idle, "after": after}))


if __name__ == "__main__":
    if sys.argv[1] == "check":
        with open(sys.argv[2]) as f:
            check(json.load(f))
    elif sys.argv[1] == "load":
        load(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        fail(f"unknown mode {sys.argv[1]}")
