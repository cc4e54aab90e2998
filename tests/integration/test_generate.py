"""sft_stack.cli.generate and trainer.generation/inference on tiny Llama models built or trained in the test (no hub, no downloads)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_chat import (
    PAIRS,
    TEMPLATE,
    memorized_model,
    one_thread,
    random_model,
    save_model_dir,
    template,
    tokenizer,
)
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from data_pipeline.schema import IGNORE_INDEX
from sft_stack.chat.conversation import Conversation, Message
from sft_stack.chat.templates import ChatTemplate
from sft_stack.cli.generate import chat, main
from trainer import inference
from trainer.generation import (
    Completion,
    GenerateError,
    decoding_for,
    generate_ids,
    generate_rows,
    generate_samples,
    generation_config,
    read_prompts,
)
from trainer.inference import load_for_inference

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return tokenizer()


@pytest.fixture(scope="module")
def tpl(tok: PreTrainedTokenizerBase) -> ChatTemplate:
    return template(tok)


@pytest.fixture(scope="module")
def memorized(tok: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    return memorized_model(tok)


@pytest.fixture(scope="module")
def memorized_dir(
    memorized: LlamaForCausalLM, tok: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return save_model_dir(memorized, tok, tmp_path_factory.mktemp("memorized"), template_name=TEMPLATE)


def peaked_model(scale: float, seed: int = 1) -> LlamaForCausalLM:
    """A random model whose next-token distribution is sharpened by scaling the head (top-p sets of ~10-400)."""
    model = random_model(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def prompt_ids(tpl: ChatTemplate, text: str) -> list[int]:
    return tpl.encode_prompt([Message(role="user", content=text)])


def step_logits(model: LlamaForCausalLM, prompt: list[int], new: list[int]) -> torch.Tensor:
    """Logits that predicted each new token, re-scored with one full forward (independent of generate's cache)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(new)]


def sequence_logprob(model: LlamaForCausalLM, prompt: list[int], done: Completion, stop_id: int) -> float:
    new = done.token_ids + ([stop_id] if done.finish_reason == "stop" else [])
    logprobs = step_logits(model, prompt, new).log_softmax(-1)
    return float(sum(logprobs[i, token] for i, token in enumerate(new)))


# ------------------------------------------------------------------------------------------ template and stop


def test_prompt_is_the_training_prefix_and_only_new_tokens_return(
    memorized: LlamaForCausalLM, tok: PreTrainedTokenizerBase, tpl: ChatTemplate, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[int]] = []
    real_generate = memorized.generate

    def spy(**kwargs: torch.Tensor) -> torch.Tensor:
        for ids, mask in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist(), strict=True):
            seen.append([t for t, m in zip(ids, mask, strict=True) if m])
        return real_generate(**kwargs)

    monkeypatch.setattr(memorized, "generate", spy)
    rows = [{"prompt": p, "system": "Be brief."} for p, _ in PAIRS]
    generate_rows(memorized, tok, tpl, rows, decoding_for("greedy", max_new_tokens=4), seed=0, batch_size=2)
    for (prompt, reply), ids in zip(PAIRS, seen, strict=True):
        conv = Conversation(
            messages=(
                Message(role="system", content="Be brief."),
                Message(role="user", content=prompt),
                Message(role="assistant", content=reply),
            ),
            source="t",
            index=0,
        )
        (trained,) = tpl.encode_batch([conv])
        first_trained = next(i for i, label in enumerate(trained.labels) if label != IGNORE_INDEX)
        assert ids == trained.input_ids[:first_trained]


def test_memorized_reply_then_stop_at_end_of_turn(
    memorized: LlamaForCausalLM, tok: PreTrainedTokenizerBase, tpl: ChatTemplate
) -> None:
    assert tpl.stop_token_ids[0] == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id
    rows = [{"prompt": p, "reference": r} for p, r in PAIRS]
    # Batch of 2 prompts of different lengths: left padding must not change either answer.
    for batch_size in (1, 2):
        results = generate_rows(memorized, tok, tpl, rows, decoding_for("greedy", max_new_tokens=30), seed=0,
                                batch_size=batch_size)  # fmt: skip
        for (prompt, reply), row in zip(PAIRS, results, strict=True):
            assert row["prompt"] == prompt and row["reference"] == reply
            assert row["output"] == reply
            assert row["finish_reason"] == "stop"
            assert row["new_tokens"] == len(tok(reply, add_special_tokens=False)["input_ids"])


def test_without_stop_tokens_generation_runs_to_max_new_tokens(
    memorized: LlamaForCausalLM, tok: PreTrainedTokenizerBase, tpl: ChatTemplate
) -> None:
    """The control for the test above: the stop comes from the template's stop ids, not from length."""
    config = generation_config(decoding_for("greedy", max_new_tokens=15), stop_token_ids=[1999], pad_token_id=0)
    (done,) = generate_ids(memorized, tok, [prompt_ids(tpl, PAIRS[0][0])], config)
    reply_tokens = len(tok(PAIRS[0][1], add_special_tokens=False)["input_ids"])
    assert done.finish_reason == "length" and len(done.token_ids) == 15
    assert done.token_ids[reply_tokens] == tpl.stop_token_ids[0]


# ------------------------------------------------------------------------------------------ decoding strategies


def test_greedy_is_deterministic_and_is_the_argmax_path(tok: PreTrainedTokenizerBase, tpl: ChatTemplate) -> None:
    model = peaked_model(scale=10)
    prompt = prompt_ids(tpl, "Tell me a story")
    config = generation_config(decoding_for("greedy", max_new_tokens=8), stop_token_ids=tpl.stop_token_ids,
                               pad_token_id=0)  # fmt: skip
    first = generate_ids(model, tok, [prompt], config)[0]
    second = generate_ids(model, tok, [prompt], config)[0]
    assert first == second and len(first.token_ids) == 8
    argmax = step_logits(model, prompt, first.token_ids).argmax(-1).tolist()
    assert first.token_ids == argmax


def test_beam_scores_at_least_greedy_by_sequence_logprob(tok: PreTrainedTokenizerBase, tpl: ChatTemplate) -> None:
    """Two new tokens make it a theorem: the beam keeps the top-k first tokens (greedy's among them) and then
    scores every continuation of each, so its best is >= greedy's. Longer outputs can prune greedy's prefix,
    so beam >= greedy is not guaranteed there (the test below checks the ranking instead)."""
    model = peaked_model(scale=10)
    stop = tpl.stop_token_ids[0]
    better = 0
    for text in ("Tell me a story", "你好", "What is 2+3?", "Write a poem about the sea"):
        prompt = prompt_ids(tpl, text)
        results = {}
        for preset in ("greedy", "beam"):
            # length_penalty 0: beams are ranked by plain sum of log-probs, the quantity compared here.
            decoding = decoding_for(preset, max_new_tokens=2, length_penalty=0.0)
            config = generation_config(decoding, stop_token_ids=tpl.stop_token_ids, pad_token_id=0)
            results[preset] = generate_ids(model, tok, [prompt], config)[0]
        greedy_lp = sequence_logprob(model, prompt, results["greedy"], stop)
        beam_lp = sequence_logprob(model, prompt, results["beam"], stop)
        assert beam_lp >= greedy_lp - 1e-4
        better += beam_lp > greedy_lp + 1e-4
    assert better >= 1, "beam search never beat greedy; the comparison above proves nothing"


def test_beam_returns_its_best_hypothesis(tok: PreTrainedTokenizerBase, tpl: ChatTemplate) -> None:
    model = peaked_model(scale=10)
    prompt = prompt_ids(tpl, "Tell me a story")
    decoding = decoding_for("beam", max_new_tokens=8, length_penalty=0.0)
    config = generation_config(decoding, stop_token_ids=tpl.stop_token_ids, pad_token_id=0)
    config.num_return_sequences = 4
    with torch.no_grad():
        beams = model.generate(input_ids=torch.tensor([prompt]), generation_config=config)[:, len(prompt) :]
    scores = [sequence_logprob(model, prompt, Completion(token_ids=b, text="", finish_reason="length"), 0)
              for b in beams.tolist()]  # fmt: skip
    assert scores[0] == pytest.approx(max(scores), abs=1e-4)
    (best,) = generate_ids(model, tok, [prompt], generation_config(decoding, stop_token_ids=tpl.stop_token_ids,
                                                                     pad_token_id=0))  # fmt: skip
    assert best.token_ids == beams[0].tolist()


def sampled(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerBase, tpl: ChatTemplate, preset: str, **kw: float
) -> list[tuple[list[int], Completion]]:
    prompts = [prompt_ids(tpl, t) for t in ("Tell me a story", "你好", "What is 2+3?")]
    config = generation_config(decoding_for(preset, max_new_tokens=12, **kw), stop_token_ids=tpl.stop_token_ids,
                               pad_token_id=0)  # fmt: skip
    torch.manual_seed(3)
    return list(zip(prompts, generate_ids(model, tok, prompts, config), strict=True))


def test_top_k_samples_stay_inside_the_k_most_likely(tok: PreTrainedTokenizerBase, tpl: ChatTemplate) -> None:
    model = peaked_model(scale=1)  # near-uniform over 2,000 tokens: a token outside the top 3 is the likely case
    off_argmax = 0
    for prompt, done in sampled(model, tok, tpl, "top_k", top_k=3):
        logits = step_logits(model, prompt, done.token_ids)
        allowed = logits.topk(3, dim=-1).indices
        for step, token in enumerate(done.token_ids):
            assert token in allowed[step].tolist(), f"step {step}: token {token} not in top-3 {allowed[step]}"
            off_argmax += token != allowed[step, 0]
    assert off_argmax > 0, "every sample was the argmax; sampling did not happen"


def test_top_p_samples_stay_inside_the_nucleus(tok: PreTrainedTokenizerBase, tpl: ChatTemplate) -> None:
    model = peaked_model(scale=20)
    sizes = []
    for prompt, done in sampled(model, tok, tpl, "top_p", top_p=0.8):
        probs = step_logits(model, prompt, done.token_ids).softmax(-1)
        for step, token in enumerate(done.token_ids):
            ordered, order = probs[step].sort(descending=True)
            # Nucleus: the smallest prefix of tokens, most likely first, whose probability reaches top_p.
            size = int((ordered.cumsum(0) < 0.8).sum()) + 1
            sizes.append(size)
            assert token in order[:size].tolist(), f"step {step}: token {token} outside the {size}-token nucleus"
    assert max(sizes) < 1000 and min(sizes) > 1, f"nucleus sizes {sizes} make the test trivial"


def test_seed_reproduces_its_output(tok: PreTrainedTokenizerBase, tpl: ChatTemplate) -> None:
    model = peaked_model(scale=1)
    rows = [{"prompt": "Tell me a story"}, {"prompt": "你好"}]

    def run(seed: int) -> list[str]:
        decoding = decoding_for("seed", max_new_tokens=10)
        return [r["output"] for r in generate_rows(model, tok, tpl, rows, decoding, seed=seed, batch_size=2)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_generate_samples_restores_mode_and_rng(memorized: LlamaForCausalLM, tok: PreTrainedTokenizerBase,
                                                tpl: ChatTemplate) -> None:  # fmt: skip
    memorized.train()
    torch.manual_seed(11)
    expected_next = torch.rand(3)
    torch.manual_seed(11)
    rows = generate_samples(memorized, tok, tpl, [{"prompt": PAIRS[0][0], "reference": PAIRS[0][1]}],
                            max_new_tokens=20, seed=0)  # fmt: skip
    assert torch.equal(torch.rand(3), expected_next)
    assert memorized.training
    memorized.eval()
    assert rows[0]["output"] == PAIRS[0][1] and rows[0]["reference"] == PAIRS[0][1]


# ------------------------------------------------------------------------------------------ context length


def test_long_prompt_is_left_truncated_with_a_warning(
    tok: PreTrainedTokenizerBase, tpl: ChatTemplate, caplog: pytest.LogCaptureFixture
) -> None:
    model = random_model(seed=0, max_position_embeddings=64)
    long_prompt = "word " * 200
    full = prompt_ids(tpl, long_prompt)
    with caplog.at_level(logging.WARNING, logger="trainer.generation"):
        (row,) = generate_rows(model, tok, tpl, [{"prompt": long_prompt}], decoding_for("greedy", max_new_tokens=8),
                               seed=0)  # fmt: skip
    assert len(full) > 64 and row["prompt_tokens"] == 64 - 8
    assert any("kept its last 56" in r.getMessage() for r in caplog.records)
    with pytest.raises(GenerateError, match="leaves no room"):
        generate_rows(model, tok, tpl, [{"prompt": "hi"}], decoding_for("greedy", max_new_tokens=64), seed=0)


def test_chat_keeps_history_and_drops_oldest_turns_over_the_context(
    memorized_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    loaded = load_for_inference(memorized_dir, device="cpu")
    tpl = template(loaded.tokenizer)
    decoding = decoding_for("greedy", max_new_tokens=16)
    history = chat(loaded, tpl, decoding, system=None, seed=0, lines=[PAIRS[0][0], "/reset", PAIRS[1][0]])
    out = capsys.readouterr().out
    # Streamed: each reply is printed as it is generated, one line per turn.
    assert out.splitlines() == [PAIRS[0][1], PAIRS[1][1]]
    assert [m.content for m in history] == [PAIRS[1][0], PAIRS[1][1]]
    # A context that holds one exchange plus a question, but not two exchanges plus a question: the first pair
    # is dropped before the third turn.
    (u1, a1), (u2, _) = PAIRS
    two_turns = tpl.encode_prompt([Message(role=r, content=c) for r, c in (("user", u1), ("assistant", a1),
                                                                           ("user", u2))])  # fmt: skip
    loaded.model.config.max_position_embeddings = len(two_turns) + 16
    with caplog.at_level(logging.WARNING, logger="sft_stack.cli.generate"):
        history = chat(loaded, tpl, decoding, system=None, seed=0, lines=[u1, u2, u1])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "history over the context: dropped the oldest 1 turn pair(s)"
    ]
    assert [m.content for m in history[:3]] == [u2, history[1].content, u1] and history[3].content == a1


# ------------------------------------------------------------------------------------------ adapters


def lora_adapter(tmp_path: Path, tok: PreTrainedTokenizerBase, base_dir: Path) -> Path:
    base = LlamaForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    peft_model = get_peft_model(base, config)
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    tok.save_pretrained(out)
    export = {"template": TEMPLATE, "method": "lora", "base_model_path": str(base_dir), "data_fingerprint": None}
    (out / "sft_export.json").write_text(json.dumps(export), encoding="utf-8")
    return out


def test_adapter_loaded_separately_and_merged_gives_the_same_outputs(
    tmp_path: Path, tok: PreTrainedTokenizerBase
) -> None:
    base_dir = save_model_dir(peaked_model(scale=10), tok, tmp_path / "base", template_name=TEMPLATE)
    adapter = lora_adapter(tmp_path, tok, base_dir)
    rows = [{"prompt": p} for p, _ in PAIRS]
    probe = torch.tensor([prompt_ids(template(tok), PAIRS[0][0])])
    outputs, logits = {}, {}
    for name, kwargs in {
        "base": {"adapter_dir": None},
        "separate": {"adapter_dir": adapter},
        "merged": {"adapter_dir": adapter, "merge": True},
        "adapter_as_model": {},
    }.items():
        loaded = load_for_inference(adapter if name == "adapter_as_model" else base_dir, device="cpu", **kwargs)
        tpl = template(loaded.tokenizer)
        results = generate_rows(loaded.model, loaded.tokenizer, tpl, rows, decoding_for("greedy", max_new_tokens=8),
                                seed=0)  # fmt: skip
        outputs[name] = [r["output"] for r in results]
        with torch.no_grad():
            logits[name] = loaded.model(input_ids=probe).logits
    assert outputs["separate"] == outputs["merged"] == outputs["adapter_as_model"]
    torch.testing.assert_close(logits["separate"], logits["merged"], atol=1e-4, rtol=1e-4)
    assert outputs["separate"] != outputs["base"], "the adapter changed nothing; the comparison proves nothing"


# ------------------------------------------------------------------------------------------ files and CLI


def test_read_prompts_jsonl_and_seed_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "system": "s"}\n\n{"prompt": "b", "reference": "r"}\n', encoding="utf-8")
    assert read_prompts(jsonl) == [{"prompt": "a", "system": "s"}, {"prompt": "b", "reference": "r"}]
    seed_csv = tmp_path / "p.csv"
    seed_csv.write_text('prompt,output\n"1+1=?","#### 2"\n你好,"你好，有什么可以帮你"\n', encoding="utf-8")
    assert read_prompts(seed_csv) == [{"prompt": "1+1=?", "reference": "#### 2"},
                                      {"prompt": "你好", "reference": "你好，有什么可以帮你"}]  # fmt: skip
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(GenerateError, match=r"bad.jsonl:2: expected an object with a non-empty string 'prompt'"):
        read_prompts(bad)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_refuses_missing_model_dir_and_missing_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             memorized_dir: Path) -> None:  # fmt: skip
    code, _, err = run_main(["--model", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: --model {tmp_path / 'nope'}: no such directory"]
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (no_tok / name).write_bytes((memorized_dir / name).read_bytes())
    code, _, err = run_main(["--model", str(no_tok), "--prompt", "hi"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{no_tok}: no tokenizer files" in err


def test_cli_refuses_an_adapter_of_another_base(tmp_path: Path, tok: PreTrainedTokenizerBase, memorized_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    adapter = lora_adapter(tmp_path, tok, memorized_dir)
    other = save_model_dir(random_model(seed=2, hidden_size=32, head_dim=8, intermediate_size=64), tok,
                           tmp_path / "other", template_name=TEMPLATE)  # fmt: skip
    code, _, err = run_main(["--model", str(other), "--adapter", str(adapter), "--prompt", "hi"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"adapter was trained on {memorized_dir}" in err and f"pass --model {memorized_dir}" in err
    # The recorded base moved away: the LoRA shapes still give the mismatch away.
    export = json.loads((adapter / "sft_export.json").read_text())
    export["base_model_path"] = str(tmp_path / "moved")
    (adapter / "sft_export.json").write_text(json.dumps(export))
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "moved")
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    code, _, err = run_main(["--model", str(other), "--adapter", str(adapter), "--prompt", "hi"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "in_features=64, --model" in err and "has 32" in err


def test_template_resolution_order(tmp_path: Path, tok: PreTrainedTokenizerBase, memorized_dir: Path) -> None:
    from data_pipeline.schema import MANIFEST_FILE

    with_export = inference.resolve_run_template(tok, model_dir=memorized_dir)
    assert with_export.template.name == TEMPLATE and with_export.source == str(memorized_dir / "sft_export.json")
    assert inference.resolve_run_template(tok, model_dir=memorized_dir, name="llama2").template.name == "llama2"
    bare = tmp_path / "bare"
    bare.mkdir()
    fallback = inference.resolve_run_template(tok, model_dir=bare)
    assert fallback.template.name == "default" and "tokenizer" in fallback.source  # tiny_bpe has no chat_template
    data = tmp_path / "data"
    data.mkdir()
    (data / MANIFEST_FILE).write_text('{"schema_version": 1}')
    with pytest.raises(GenerateError, match="unreadable manifest"):
        inference.resolve_run_template(tok, model_dir=bare, data_dir=data)


def test_cli_end_to_end_on_the_seed_csv(tmp_path: Path, memorized_dir: Path) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,output\n" + "".join(f'"{p}","{r}"\n' for p, r in PAIRS), encoding="utf-8")
    out = tmp_path / "gen.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "sft_stack.cli.generate", "--model", str(memorized_dir), "--prompts-file", str(prompts),
         "--preset", "greedy", "--max-new-tokens", "30", "--batch-size", "2", "--out", str(out), "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"template: {TEMPLATE} (from {memorized_dir / 'sft_export.json'})" in done.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["prompt"], r["output"], r["reference"], r["finish_reason"]) for r in rows] == [
        (p, r, r, "stop") for p, r in PAIRS
    ]


def test_qlora_adapter_runs_on_an_nf4_base(tmp_path: Path, tok: PreTrainedTokenizerBase) -> None:
    import bitsandbytes as bnb

    base_dir = save_model_dir(peaked_model(scale=10), tok, tmp_path / "base", template_name=TEMPLATE)
    adapter = lora_adapter(tmp_path, tok, base_dir)
    loaded = load_for_inference(base_dir, adapter, device="cpu", load_in_4bit=True)
    q_proj = loaded.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and "default" in q_proj.lora_A
    (row,) = generate_rows(loaded.model, loaded.tokenizer, template(loaded.tokenizer), [{"prompt": "hi"}],
                           decoding_for("greedy", max_new_tokens=4), seed=0)  # fmt: skip
    assert row["new_tokens"] == 4 or row["finish_reason"] == "stop"
    with pytest.raises(GenerateError, match="--merge with --load-in-4bit"):
        load_for_inference(base_dir, adapter, device="cpu", load_in_4bit=True, merge=True)
