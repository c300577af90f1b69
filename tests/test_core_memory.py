"""The residual memory at inference: exactness when off, per-sequence retrieval in a batch,
padding on either side, generation with and without a KV cache, and save/load in a new process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from memoir import Editor, EditDelta, MemoirConfig, MemoryState
from memoir.tinymodel import ARCHITECTURES

PROMPTS = [
    "What university did Watts Humphrey attend?",
    "Which family does Ramalinaceae belong to?",
    "nq question: who sang nice day for a white wedding",
    "Who was the designer of Lahti Town Hall?",
]
BACKGROUND = [
    "nq question: who played desmond doss father in hacksaw ridge",
    "nq question: types of skiing in the winter olympics 2018",
    "nq question: where does aarp fall on the political spectrum",
    "nq question: who is the lead singer of the band queen",
    "nq question: when was the first iphone released",
    "nq question: what is the capital city of australia",
]
# zsRE dev records 0..3 (src, rephrase, alt) and unrelated NQ questions (loc)
EDITS = [
    ("What university did Watts Humphrey attend?", "What university did Watts Humphrey take part in?",
     "University of Michigan"),
    ("Which family does Ramalinaceae belong to?", "What family are Ramalinaceae?", "Lamiinae"),
    ("What role does Denny Herzig play in football?", "What's Denny Herzig's role in football?", "winger"),
    ("What artist created Call the Doctor?", "Which artist created Call the Doctor?", "The X-Files"),
]
UNRELATED = [
    "nq question: who played desmond doss father in hacksaw ridge",
    "nq question: types of skiing in the winter olympics 2018",
    "nq question: who sang nice day for a white wedding",
]


def logits_of(model, batch, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                     use_cache=False).logits


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore padding (needed with left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@pytest.fixture
def edited(trained_llama) -> Editor:
    """The trained tiny Llama with the first three zsRE edits applied (layer 2, k = 146)."""
    model, tokenizer = trained_llama
    editor = Editor.create(model, tokenizer, BACKGROUND, MemoirConfig(layer=2, top_k=146))
    for i, (prompt, _, target) in enumerate(EDITS[:3]):
        editor.edit(prompt, target, edit_id=i, score=False)
    return editor


# --------------------------------------------------------------------------- memory off = base model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_zero_memory_gives_the_base_logits_exactly(arch, tiny_model_factory):
    base, _ = tiny_model_factory(arch)
    model, tokenizer = tiny_model_factory(arch)
    editor = Editor.create(model, tokenizer, BACKGROUND, MemoirConfig(layer=2))
    batch = editor.batch(PROMPTS)
    expected = logits_of(base, batch)
    assert torch.equal(logits_of(model, batch), expected)  # empty index

    # A stored mask that the first prompt retrieves, with W_m still zero: the memory path runs
    # (out + W_m (M ⊙ a)) and must still give the base logits bit for bit.
    mask = editor.mask_of(PROMPTS[0])
    editor.memory.add_edit(0, EditDelta(mask=mask, dense_=torch.zeros(editor.memory.site.out_features, mask.numel())))
    got = logits_of(model, batch)
    assert editor.memory.retrieved_edits()[0] == [0]
    assert torch.equal(got, expected)
    with editor.memory.disabled():
        assert torch.equal(logits_of(model, batch), expected)


def test_memory_changes_the_output_when_retrieved(edited, trained_llama_path):
    """The counterpart of the exactness tests: a retrieved edit does change the logits."""
    from memoir.tinymodel import load_pretrained_pair

    base, _ = load_pretrained_pair(trained_llama_path)
    batch = edited.batch([EDITS[0][0]])
    assert not torch.equal(logits_of(edited.model, batch), logits_of(base, batch))
    assert edited.memory.retrieved_edits() == [[0]]


def test_prompts_below_threshold_keep_the_base_logits_after_edits(edited, trained_llama_path):
    from memoir.tinymodel import load_pretrained_pair

    base, _ = load_pretrained_pair(trained_llama_path)
    prompts = [EDITS[0][0]] + UNRELATED + [EDITS[1][0]]
    batch = edited.batch(prompts)
    got = logits_of(edited.model, batch)
    decision = edited.memory.last
    off = (decision.rows < 0).nonzero().flatten().tolist()
    assert decision.rows[0] >= 0 and decision.rows[-1] >= 0  # the edited prompts retrieve
    assert off, "no unrelated prompt fell below the threshold"
    assert all(decision.ratios[i] < edited.config.threshold for i in off)
    expected = logits_of(base, batch)
    for i in off:
        assert torch.equal(got[i], expected[i]), f"prompt {prompts[i]!r} is below threshold but changed"


def test_background_mean_is_the_token_mean_over_the_background_prompts(trained_llama):
    model, tokenizer = trained_llama
    editor = Editor.create(model, tokenizer, BACKGROUND, MemoirConfig(layer=2, top_k=146))
    captured = []
    handle = editor.memory.base.register_forward_pre_hook(lambda _m, args: captured.append(args[0][0]))
    with torch.no_grad(), editor.memory.disabled():
        for prompt in BACKGROUND:  # one at a time: no padding at all
            model(input_ids=torch.tensor([editor.codec.prompt_ids(prompt)]))
    handle.remove()
    tokens = torch.cat(captured)  # (all prompt tokens, D)
    assert tokens.shape[0] > len(BACKGROUND)
    torch.testing.assert_close(editor.memory.background, tokens.mean(0), atol=1e-5, rtol=1e-5)
    assert editor.state().background_prompts == BACKGROUND


# --------------------------------------------------------------------------- edited prompt → target


def test_edited_prompts_generate_their_targets(edited):
    prompts = [prompt for prompt, _, _ in EDITS[:3]]
    targets = [target for _, _, target in EDITS[:3]]
    before = edited.generate(prompts, max_new_tokens=8, use_memory=False)
    after = edited.generate(prompts, max_new_tokens=8)
    for prompt, target, old, new in zip(prompts, targets, before, after):
        assert not old.startswith(target), f"{prompt!r} already answered {target!r}"
        assert new.startswith(target), f"{prompt!r} → {new!r}, expected {target!r}"


# --------------------------------------------------------------------------- batch vs one by one


@pytest.mark.parametrize("left_pad", [False, True], ids=["right-padding", "left-padding"])
def test_batched_and_single_inference_agree(edited, left_pad):
    prompts = [EDITS[0][0], UNRELATED[0], EDITS[2][1], EDITS[1][0] + " Think about it carefully.", UNRELATED[1],
               EDITS[0][1]]
    batch = edited.batch(prompts, left_pad=left_pad)
    together = logits_of(edited.model, batch, positions(batch.attention_mask))
    decisions = edited.memory.retrieved_edits()
    assert any(decisions) and not all(decisions)  # a mixed batch: some sequences use the memory, some not
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(set(lengths)) > 1  # real padding
    for i, prompt in enumerate(prompts):
        single = edited.batch([prompt])
        alone = logits_of(edited.model, single)[0]
        assert edited.memory.retrieved_edits()[0] == decisions[i], prompt
        real = batch.attention_mask[i]
        torch.testing.assert_close(together[i][real], alone, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- generate with/without cache


def generate_watching_decisions(editor: Editor, prompts: list[str], use_cache: bool) -> tuple[list[str], list]:
    """Greedy generation, and the memory's decision (rows, ratios) seen by every forward of it."""
    seen: list[tuple[list[int], list[float]]] = []

    def watch(memory, _inputs, _output) -> None:
        seen.append((memory.last.rows.tolist(), memory.last.ratios.tolist()))

    handle = editor.memory.register_forward_hook(watch)
    try:
        texts = editor.generate(prompts, max_new_tokens=10, use_cache=use_cache)
    finally:
        handle.remove()
    return texts, seen


def test_generate_with_and_without_cache_agree(edited):
    prompts = [EDITS[0][0], UNRELATED[0], EDITS[1][0], EDITS[2][1], UNRELATED[2], EDITS[2][0]]
    cached, cached_seen = generate_watching_decisions(edited, prompts, use_cache=True)
    cached_edits = edited.memory.retrieved_edits()
    uncached, uncached_seen = generate_watching_decisions(edited, prompts, use_cache=False)
    assert len(cached_seen) == len(uncached_seen) == 10
    # the decision taken at prefill, from the prompt alone, holds for every generated token
    assert all(step == cached_seen[0] for step in cached_seen + uncached_seen)
    assert edited.memory.retrieved_edits() == cached_edits
    assert cached_edits[0] == [0] and cached_edits[2] == [1] and cached_edits[5] == [2]
    assert cached_edits[1] == [] and cached_edits[4] == []
    assert cached == uncached
    assert cached[0].startswith(EDITS[0][2]) and cached[2].startswith(EDITS[1][2])


def test_a_users_own_generate_and_decoding_loop_decide_as_the_editor(edited):
    """`model.generate` called directly (what `memoir serve` and users call), with or without a KV
    cache, one prompt or a left-padded batch, and a hand-written decoding loop over the cache, all
    take the retrieval decision from the prompt and give the editor's tokens."""
    prompts = [EDITS[0][0], UNRELATED[0], EDITS[1][0], EDITS[2][1], UNRELATED[2], EDITS[2][0]]
    expected = edited.generate(prompts, max_new_tokens=8)
    expected_edits = edited.memory.retrieved_edits()
    model, pad = edited.model, edited.codec.pad_id

    def decode(out: torch.Tensor, start: int) -> list[str]:
        return [edited.tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in out]

    batch = edited.batch(prompts, left_pad=True)
    for use_cache in (True, False):
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=8,
                             do_sample=False, use_cache=use_cache, pad_token_id=pad)
        assert decode(out, batch.input_ids.shape[1]) == expected, f"use_cache={use_cache}"
        assert edited.memory.retrieved_edits() == expected_edits
    for i, prompt in enumerate(prompts):
        single = edited.batch([prompt])
        out = model.generate(input_ids=single.input_ids, max_new_tokens=8, do_sample=False, pad_token_id=pad)
        assert decode(out, single.input_ids.shape[1]) == [expected[i]], prompt
        assert edited.memory.retrieved_edits() == [expected_edits[i]], prompt
    # greedy decoding by hand: one prefill, then one token at a time through the cache
    single = edited.batch([prompts[0]])
    with torch.no_grad():
        step = model(input_ids=single.input_ids, use_cache=True)
        tokens = [int(step.logits[0, -1].argmax())]
        for _ in range(7):
            step = model(input_ids=torch.tensor([[tokens[-1]]]), cache=step.past_key_values, use_cache=True)
            tokens.append(int(step.logits[0, -1].argmax()))
    assert edited.memory.retrieved_edits() == [expected_edits[0]]
    assert edited.tokenizer.decode(tokens, skip_special_tokens=True).strip() == expected[0]


# --------------------------------------------------------------------------- save / load, new process

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from memoir import Editor, MemoryState
    from memoir.tinymodel import load_pretrained_pair
    model_dir, state_dir, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model, tokenizer = load_pretrained_pair(model_dir)
    editor = Editor.from_state(model, tokenizer, MemoryState.load(state_dir))
    masks = [editor.mask_of(p).tolist() for p in prompts]
    batch = editor.batch(prompts)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    print(json.dumps({"masks": masks, "retrieved": editor.memory.retrieved_edits(),
                      "stored": {str(k): v.tolist() for k, v in editor.memory.index.masks().items()},
                      "argmax": logits.argmax(-1).tolist(), "generated": editor.generate(prompts, 6)}))
    """
)


def test_masks_and_decisions_reproduce_after_save_load_in_a_new_process(edited, trained_llama_path, tmp_path):
    edited.state().save(tmp_path / "memory")
    prompts = [EDITS[0][0], EDITS[1][1], UNRELATED[0], EDITS[2][0]]
    batch = edited.batch(prompts)
    argmax = logits_of(edited.model, batch).argmax(-1).tolist()
    retrieved = edited.memory.retrieved_edits()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(trained_llama_path), str(tmp_path / "memory"),
                           json.dumps(prompts)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["masks"] == [edited.mask_of(p).tolist() for p in prompts]
    assert child["stored"] == {str(k): v.tolist() for k, v in edited.memory.index.masks().items()}
    assert child["masks"][0] == child["stored"]["0"]  # an edited prompt finds its own stored mask again
    assert child["retrieved"] == retrieved
    assert child["argmax"] == argmax
    assert child["generated"] == edited.generate(prompts, 6)


def test_state_round_trip_in_process(edited, tmp_path):
    state = edited.state()
    again = MemoryState.load(state.save(tmp_path / "m"))
    assert again.config == state.config and again.model == state.model
    assert torch.equal(again.permutation, state.permutation)
    assert torch.equal(again.background, state.background)
    assert torch.equal(again.weight, state.weight)
    assert again.masks.keys() == state.masks.keys()
    assert all(torch.equal(again.masks[i], state.masks[i]) for i in state.masks)
    assert (again.context_prefixes, again.background_prompts, again.prepend_bos) == (
        state.context_prefixes, state.background_prompts, state.prepend_bos)
