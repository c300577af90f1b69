"""OpenAI compatibility on the real model: `memoir serve --model smollm2` as a real process, queried
with the official `openai` client (completions, chat, streaming, logprobs, refusals) and with
lm-evaluation-harness (`local-completions`: one generate_until task and one multiple_choice
(loglikelihood) task, from the local task files in tests/data/lm_eval/).

One store for the module: a zsRE edit of SmolLM2 made with `memoir apply`; one server, started
once. lm-evaluation-harness is heavy (`pip install -e .[harness]`): its test is skipped without it.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_serving_http import Server

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "data" / "lm_eval"
NAME = "smol"
EDITS = (0,)  # zsRE record 0: Watts Humphrey -> University of Michigan (one edit: SmolLM2 edits cost a minute here)

pytestmark = pytest.mark.slow


def memoir(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)


@pytest.fixture(scope="module")
def server(tmp_path_factory, zsre):
    work = tmp_path_factory.mktemp("oai")
    requests = work / "edits.jsonl"
    requests.write_text("".join(json.dumps({"prompt": zsre[i]["src"], "target": zsre[i]["alt"],
                                            "rephrases": [zsre[i]["rephrase"]]}) + "\n" for i in EDITS))
    done = memoir("apply", "--model", "smollm2", "--file", str(requests), "--store", str(work / "store"),
                  "--name", NAME, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "MEMOIR_REDIS_URL": "redis://127.0.0.1:1/0"}  # no Redis: the server polls the store
    served = Server(["serve", "--model", "smollm2", "--name", NAME, "--store", str(work / "store"), "--port", "0",
                     "--max-tokens", "48"], env, work / "serve.log").start()
    served.work = work
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_official_client(client, server, zsre):
    edited, paraphrase = zsre[0]["src"], zsre[0]["rephrase"]
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("smollm2")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt=edited, max_tokens=4)

    answer = client.completions.create(model=NAME, prompt=edited, max_tokens=12)
    text = answer.choices[0].text
    assert "Michigan" in text and answer.model == NAME and answer.usage.completion_tokens <= 12
    assert answer.model_extra["memoir"]["retrieved"] == [[1]]
    streamed = "".join(chunk.choices[0].text for chunk in
                       client.completions.create(model=NAME, prompt=edited, max_tokens=12, stream=True)
                       if chunk.choices)
    assert streamed == text

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": edited}], max_tokens=12)
    assert chat.choices[0].message.content == text.strip()  # one user turn: exactly the edit's prompt
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": edited}], max_tokens=12, stream=True) if chunk.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    unbounded = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": paraphrase}],
                                               extra_body={"ignore_eos": True})
    assert unbounded.usage.completion_tokens == 48  # no max_tokens: to the server's --max-tokens, not 16

    scored = client.completions.create(model=NAME, prompt=edited, max_tokens=1, echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs
    prompt_tokens = scored.usage.prompt_tokens
    assert scored.choices[0].text.startswith(edited) and len(logprobs.tokens) == prompt_tokens + 1
    assert logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens[:prompt_tokens]) == edited
    best = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": edited}], max_tokens=4,
                                          logprobs=True, top_logprobs=2)
    content = best.choices[0].logprobs.content
    assert len(content) == best.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy: each token is the best

    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=NAME, prompt=edited, max_tokens=4, presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": edited}],
                                       response_format={"type": "json_object"})


def test_lm_evaluation_harness_local_completions(server, tmp_path):
    pytest.importorskip("lm_eval")
    from memoir.sources import smollm2_path
    from transformers import AutoTokenizer

    out = tmp_path / "lm_eval"
    args = ",".join([f"base_url={server.url}/v1/completions", f"model={NAME}", f"tokenizer={smollm2_path()}",
                     "tokenizer_backend=huggingface"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OPENAI_API_KEY": "unused"}
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                           "--tasks", "memoir_zsre_gen,memoir_zsre_mc", "--include_path", str(TASKS),
                           "--output_path", str(out), "--log_samples"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    results = json.loads(Path(max(glob.glob(str(out / "**" / "results_*.json"), recursive=True))).read_text())
    gen, mc = results["results"]["memoir_zsre_gen"], results["results"]["memoir_zsre_mc"]
    print("lm-eval:", {"contains": gen["contains,none"], "acc": mc["acc,none"]})

    def samples(task: str) -> list[dict]:
        path = max(glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True))
        return sorted((json.loads(line) for line in Path(path).read_text().splitlines()), key=lambda s: s["doc_id"])

    # what lm-eval read is what the server answers: the same text ...
    for sample in samples("memoir_zsre_gen"):
        question = sample["doc"]["question"]
        direct = server.complete(question, max_tokens=20, stop=["\n\n"])["choices"][0]["text"]
        assert sample["filtered_resps"][0] == direct, question
    # ... and the same log-likelihoods: context + " " + choice, scored by the server's echo
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    for sample in samples("memoir_zsre_mc"):
        question = sample["doc"]["question"]
        for choice, resp in zip(sample["doc"]["choices"], sample["resps"]):
            context = tokenizer(question, add_special_tokens=False)["input_ids"]
            whole = tokenizer(question + " " + choice, add_special_tokens=False)["input_ids"]
            scored = server.post("/v1/completions", {"prompt": whole, "max_tokens": 0, "echo": True, "logprobs": 1})
            expected = sum(scored["choices"][0]["logprobs"]["token_logprobs"][len(context):])
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-3), (question, choice)
    # the edit is what lm-eval sees: the edited question's answer carries its target
    first = samples("memoir_zsre_gen")[0]
    assert first["doc"]["kind"] == "prompt" and first["doc"]["answer"] in first["filtered_resps"][0]
