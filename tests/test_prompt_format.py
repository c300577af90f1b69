"""`--prompt-format chat` on `memoir apply` and `memoir worker`: the memory records it, a stored
memory refuses the other format, and the served model formats prompts and chat turns with the
tokenizer's chat template (tiny model with a template added, real processes for the CLI)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from memoir import tinymodel
from pipeline.cli import main
from serving.model import load
from store import Store

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"


def memoir(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_apply_records_the_chat_format_and_serving_uses_the_template(tmp_path, zsre):
    model_dir = tmp_path / "model"
    shutil.copytree(tinymodel.builtin_model_path(), model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config_path.write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": zsre[0]["src"], "target": zsre[0]["alt"]}) + "\n")
    store = str(tmp_path / "store")

    done = memoir("apply", "--model", str(model_dir), "--file", str(edits), "--store", store, "--name", "c",
                  "--prompt-format", "chat", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    with Store.open(store) as opened:
        assert opened.load_state("c").config.prompt_format == "chat"
    refused = memoir("apply", "--model", str(model_dir), "--file", str(edits), "--store", store, "--name", "c",
                     "--prompt-format", "plain")
    assert refused.returncode != 0 and "prompt_format plain (stored: chat)" in refused.stderr, refused.stderr
    assert memoir("apply", "--model", str(model_dir), "--file", str(edits), "--store", store, "--name", "c",
                  "--prompt-format", "xml").returncode == 2  # not a choice

    served = load(str(model_dir), store=store, name="c")
    try:
        tokenizer = served.tokenizer

        def template(messages: list[dict]) -> list[int]:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": zsre[0]["src"]}]
        assert served.editor.codec.prompt_format == "chat"
        assert served.prompt_ids(zsre[0]["src"]) == template(convo[1:])  # completions too: as the edit was made
        assert served.chat_ids(convo) == template(convo)
        assert template(convo) != tokenizer("Be brief.\n" + zsre[0]["src"], add_special_tokens=False)["input_ids"]
    finally:
        served.close()


def test_worker_and_apply_take_the_flag():
    for command in (["worker", "--help"], ["apply", "--help"]):
        shown = CliRunner().invoke(main, command)
        assert shown.exit_code == 0 and "--prompt-format [plain|chat]" in shown.output, shown.output
