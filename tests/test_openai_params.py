"""The OpenAI routes in-process on the built-in tiny model (fast): parameters the server does not
implement are refused with 400 naming them, token-id prompts, `n`, `stop`, `echo` + `logprobs`
(memory applied as in generation), the model is the memory's name, chat without `max_tokens`.

The real server process, the official `openai` client and lm-evaluation-harness on SmolLM2 are
in tests/test_openai_compat.py."""

from __future__ import annotations

import math
import time

import pytest
import torch
from fastapi.testclient import TestClient

from memoir import MemoirConfig
from serving.app import create_app
from serving.engine import Engine
from serving.model import load
from workers.runtime import Runtime

NAME = "oai"
SERVED = MemoirConfig(check_size=1, threshold=0.9)  # retrieval only for the edited prompt (see test_serving)
CAP = 1000  # the server's max_tokens cap: above the tiny model's 256-token context


@pytest.fixture(scope="module")
def stack(trained_llama_path, zsre, tmp_path_factory):
    """A memory with one edit (zsre[0]) on the trained tiny Llama, served by the real app."""
    from memoir import tinymodel

    store = tmp_path_factory.mktemp("oai") / "store"
    model, tokenizer = tinymodel.load_pretrained_pair(trained_llama_path)
    runtime = Runtime.open(model, str(store), name=NAME, tokenizer=tokenizer, config=SERVED)
    outcome = runtime.apply_request({"prompt": zsre[0]["src"], "target": zsre[0]["alt"], "request_id": "a"})
    assert outcome["status"] == "applied", outcome
    runtime.close()
    served = load(trained_llama_path, store=store, name=NAME)
    engines = []

    def start():
        engines.append(Engine(served, max_tokens_limit=CAP))
        return engines[0], None

    with TestClient(create_app(start)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(0.05)
        client.served, client.engine = served, engines[0]
        yield client
    served.close()


def post(client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def refused(client, path: str, body: dict, status: int = 400) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == status, (body, response.text)
    return response.json()["error"]


def test_unimplemented_parameters_are_refused_naming_them(stack):
    for path, base in (("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})):
        for extra, named in (({"logit_bias": {"5": 10}}, "logit_bias"), ({"presence_penalty": 0.5}, "presence_penalty"),
                             ({"frequency_penalty": -1}, "frequency_penalty"), ({"top_k": 5}, "top_k"),
                             ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                             ({"response_format": {"type": "json_object"}}, "response_format"),
                             ({"best_of": 3}, "best_of"), ({"made_up": 1}, "made_up")):
            err = refused(stack, path, {**base, **extra})
            assert err["param"] == named and named in err["message"] and err["type"] == "invalid_request_error"
        err = refused(stack, path, {**base, "logit_bias": {"5": 1}, "tools": [{}], "zzz": 1})
        assert err["param"] == "logit_bias" and all(k in err["message"] for k in ("logit_bias", "tools", "zzz"))
        # the same parameters at their neutral values ask for nothing: accepted
        neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": [],
                   "response_format": {"type": "text"}, "user": "someone", "seed": 3}
        assert post(stack, path, {**base, **neutral})["choices"]
    err = refused(stack, "/v1/completions", {"prompt": "x", "suffix": "y"})
    assert err["param"] == "suffix"
    err = refused(stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": []}]})
    assert "tool_calls" in err["param"]
    assert refused(stack, "/v1/completions", {"prompt": "x", "logprobs": 1, "stream": True})["param"] == "logprobs"


def test_token_id_prompts_are_used_as_given(stack, zsre):
    text, other = zsre[0]["src"], zsre[300]["src"]
    ids, other_ids = stack.served.prompt_ids(text), stack.served.prompt_ids(other)
    by_text = post(stack, "/v1/completions", {"prompt": [text, other], "max_tokens": 6})
    one = post(stack, "/v1/completions", {"prompt": ids, "max_tokens": 6})
    many = post(stack, "/v1/completions", {"prompt": [ids, other_ids], "max_tokens": 6})
    assert [c["text"] for c in many["choices"]] == [c["text"] for c in by_text["choices"]]
    assert one["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert many["memoir"]["retrieved"] == by_text["memoir"]["retrieved"] == [[1], []]  # the edit: by ids too
    assert many["usage"]["prompt_tokens"] == len(ids) + len(other_ids)
    assert one["choices"][0]["text"].strip().startswith(zsre[0]["alt"])
    vocab = stack.engine.vocab
    for bad in ([vocab], [-1], [[1, 2], [vocab + 5]], [[]], []):
        assert refused(stack, "/v1/completions", {"prompt": bad, "max_tokens": 2})["param"] == "prompt", bad
    assert refused(stack, "/v1/completions", {"prompt": [1.5, 2], "max_tokens": 2})["param"].startswith("prompt")


def test_n_choices(stack, zsre):
    prompts = [zsre[0]["src"], zsre[300]["src"]]
    greedy = post(stack, "/v1/completions", {"prompt": prompts, "max_tokens": 5, "n": 3})
    assert [c["index"] for c in greedy["choices"]] == list(range(6))
    texts = [c["text"] for c in greedy["choices"]]
    assert texts[:3] == [texts[0]] * 3 and texts[3:] == [texts[3]] * 3 and texts[0] != texts[3]
    assert greedy["memoir"]["retrieved"] == [[1]] * 3 + [[]] * 3
    assert greedy["usage"]["prompt_tokens"] == sum(len(stack.served.prompt_ids(p)) for p in prompts)
    sampled = post(stack, "/v1/completions", {"prompt": prompts[1], "max_tokens": 12, "n": 4, "temperature": 1.5,
                                              "seed": 1, "ignore_eos": True})
    assert len({c["text"] for c in sampled["choices"]}) > 1  # n samples, not one answer repeated
    chat = post(stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompts[0]}],
                                               "max_tokens": 5, "n": 2})
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert chat["choices"][0]["message"] == chat["choices"][1]["message"]
    assert refused(stack, "/v1/completions", {"prompt": ["x"] * 33, "n": 2})["param"] == "prompt"
    assert refused(stack, "/v1/completions", {"prompt": "x", "n": 0})["param"] == "n"


def test_stop_as_openai_allows(stack, zsre):
    prompt = zsre[300]["src"]
    full = post(stack, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "ignore_eos": True})
    full = full["choices"][0]["text"]
    word = full.split()[1]
    cut = full[: full.index(word)]
    for stop in (word, [word], ["\x00never", "\x01", word, "\x02", "\x03"]):  # a string, or a list (up to 16)
        choice = post(stack, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "stop": stop,
                                                 "ignore_eos": True})["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (cut, "stop"), stop
    assert post(stack, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "ignore_eos": True,
                                           "stop": None})["choices"][0]["text"] == full
    assert refused(stack, "/v1/completions", {"prompt": prompt, "stop": ["a"] * 17})["param"] == "stop"
    assert refused(stack, "/v1/completions", {"prompt": prompt, "stop": [""]})["param"] == "stop"


def reference_logprobs(served, ids: list[int], use_memory: bool = True, prompt: int | None = None) -> list[float]:
    """Each token's log-probability after the ones before it, computed here from the model alone,
    retrieval decided from the first `prompt` tokens (default: all), as generation decides it."""
    memory = served.editor.memory
    previous, memory.enabled = memory.enabled, use_memory
    extent = torch.zeros(1, len(ids), dtype=torch.bool)
    extent[0, : prompt or len(ids)] = True
    try:
        with torch.no_grad(), memory.prompt_extent(extent):
            logits = served.model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        memory.enabled = previous
    logprobs = logits.log_softmax(-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_echo_and_logprobs_score_the_prompt_with_the_memory_as_in_generation(stack, zsre):
    edited, other = zsre[0]["src"], zsre[300]["src"]
    ids = stack.served.prompt_ids(edited)
    whole = ids  # retrieval is decided from the whole scored text, as at a generation's prefill
    scored = post(stack, "/v1/completions", {"prompt": whole, "max_tokens": 0, "echo": True, "logprobs": 2})
    choice = scored["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == stack.served.tokenizer.decode(whole) and choice["finish_reason"] == "length"
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert len(logprobs["tokens"]) == len(logprobs["text_offset"]) == len(whole)
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(whole))]
    assert scored["memoir"]["retrieved"] == [[1]] and scored["usage"]["completion_tokens"] == 0
    expected = reference_logprobs(stack.served, whole)
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    for lp, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert 2 <= len(top) <= 3 and max(top.values()) >= lp - 1e-6 and lp in top.values()
    # without the memory the same prompt scores otherwise (the edit's columns are applied at every position)
    base = post(stack, "/v1/completions", {"prompt": whole, "max_tokens": 0, "echo": True, "logprobs": 0,
                                           "use_memory": False})
    assert base["memoir"]["retrieved"] == [[]]
    base_logprobs = base["choices"][0]["logprobs"]["token_logprobs"][1:]
    assert base_logprobs == pytest.approx(reference_logprobs(stack.served, whole, use_memory=False), abs=1e-4)
    assert max(abs(a - b) for a, b in zip(base_logprobs, logprobs["token_logprobs"][1:])) > 1e-2

    # generation and scoring agree: the generated tokens' logprobs are those of prompt + answer
    # scored as one prompt, each prompt batched beside another of another length (left padding)
    others = stack.served.prompt_ids(other)
    both = post(stack, "/v1/completions", {"prompt": [ids, others], "max_tokens": 3, "echo": True, "logprobs": 1})
    assert both["memoir"]["retrieved"] == [[1], []]
    for row, choice in zip((ids, others), both["choices"]):
        with torch.no_grad():  # the same greedy tokens, EOS included, from the model alone
            out = stack.served.model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row)).long(),
                                              max_new_tokens=3, do_sample=False,
                                              pad_token_id=stack.served.editor.codec.pad_id)
        new = out[0, len(row):].tolist()
        got = choice["logprobs"]
        assert len(got["tokens"]) == len(row) + len(new) and got["token_logprobs"][0] is None
        expected = reference_logprobs(stack.served, row + new, prompt=len(row))  # the prompt decides
        assert got["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
        assert all(math.isfinite(x) for x in got["token_logprobs"][1:])
    # without echo: only the generated tokens, offsets from the start of the answer
    plain = post(stack, "/v1/completions", {"prompt": edited, "max_tokens": 3, "logprobs": 1, "ignore_eos": True})
    got = plain["choices"][0]["logprobs"]
    assert len(got["tokens"]) == 3 and got["text_offset"][0] == 0 and None not in got["token_logprobs"]
    assert refused(stack, "/v1/completions", {"prompt": "x", "max_tokens": 0})["param"] == "max_tokens"
    assert refused(stack, "/v1/completions", {"prompt": "x", "logprobs": 21})["param"] == "logprobs"


def test_echo_streams_the_prompt_first(stack, zsre):
    prompt = zsre[300]["src"]
    with stack.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "echo": True,
                                                        "stream": True}) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    import json

    chunks = [json.loads(line) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    single = post(stack, "/v1/completions", {"prompt": prompt, "max_tokens": 4})
    plain = single["choices"][0]["text"]
    assert chunks[0]["choices"][0]["text"] == prompt and text == prompt + plain

    # n streamed choices: each index's text, finished once, and the usage chunk counts the prompt once
    with stack.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "n": 2, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == plain and sum(c["finish_reason"] is not None for c in mine) == 1
    assert chunks[-1]["usage"]["prompt_tokens"] == len(stack.served.prompt_ids(prompt))
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * single["usage"]["completion_tokens"]


def test_the_model_is_the_memory(stack):
    listed = stack.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == [NAME]
    assert stack.get(f"/v1/models/{NAME}").json()["id"] == NAME
    response = stack.get("/v1/models/builtin")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})):
        err = refused(stack, path, {**body, "model": "gpt-4o"}, status=404)
        assert err["code"] == "model_not_found" and err["param"] == "model" and NAME in err["message"]
        assert post(stack, path, {**body, "model": NAME})["model"] == NAME
        assert post(stack, path, body)["model"] == NAME


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(stack, zsre):
    messages = [{"role": "user", "content": zsre[300]["src"]}]
    ids = stack.served.chat_ids(messages)
    answer = post(stack, "/v1/chat/completions", {"messages": messages, "ignore_eos": True})
    assert answer["usage"]["completion_tokens"] == stack.engine.context - len(ids)  # not 16
    assert answer["choices"][0]["finish_reason"] == "length"
    stack.engine.max_tokens_limit = 20  # the server's --max-tokens bounds it
    try:
        answer = post(stack, "/v1/chat/completions", {"messages": messages, "ignore_eos": True})
        assert answer["usage"]["completion_tokens"] == 20
        assert refused(stack, "/v1/chat/completions", {"messages": messages, "max_tokens": 21})["param"] == "max_tokens"
    finally:
        stack.engine.max_tokens_limit = CAP
    completion = post(stack, "/v1/completions", {"prompt": zsre[300]["src"], "ignore_eos": True})
    assert completion["usage"]["completion_tokens"] == 16  # a completion keeps OpenAI's default


def test_chat_logprobs(stack, zsre):
    messages = [{"role": "user", "content": zsre[0]["src"]}]
    answer = post(stack, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "logprobs": True,
                                                  "top_logprobs": 3, "ignore_eos": True})
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert "".join(c["token"] for c in content).strip() == answer["choices"][0]["message"]["content"]
    assert all(c["logprob"] <= c["top_logprobs"][0]["logprob"] + 1e-6 for c in content)
    assert refused(stack, "/v1/chat/completions", {"messages": messages, "top_logprobs": 2})["param"] == "top_logprobs"
