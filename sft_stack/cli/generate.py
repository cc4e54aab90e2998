"""Generate from a trained model: one prompt, a prompts file, or an interactive chat.

    python -m sft_stack.cli.generate --model OUT/final --prompt "1+1=?" --preset greedy
    python -m sft_stack.cli.generate --model BASE --adapter OUT/final --prompts-file prompts.jsonl --out gen.jsonl
    python -m sft_stack.cli.generate --model OUT/final --chat --preset seed

The command and the chat REPL; decoding is trainer/generation.py, loading the model, adapter and template is
trainer/inference.py. The template in use is printed on one stderr line. See docs/generation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sft_stack.chat.conversation import Message
from sft_stack.cli.flags import (
    add_decoding_flags,
    add_model_flags,
    decoding_from_args,
    load_from_args,
    setup_logging,
    template_from_args,
)
from trainer.generation import (
    Decoding,
    GenerateError,
    fit_history,
    generate_ids,
    generate_rows,
    generation_config,
    pad_token_id,
    prompt_budget,
    read_prompts,
)
from trainer.inference import Loaded

if TYPE_CHECKING:
    from sft_stack.chat.templates import ChatTemplate

log = logging.getLogger(__name__)


def chat(
    loaded: Loaded,
    template: ChatTemplate,
    decoding: Decoding,
    *,
    system: str | None,
    seed: int,
    lines: Iterable[str],
) -> list[Message]:
    """Interactive multi-turn chat: each line of ``lines`` is a user turn, the reply streams to stdout as it
    is generated. ``/reset`` clears the history, ``/exit`` (or end of input) stops. Returns the history."""
    from transformers import TextStreamer, set_seed

    tokenizer, model = loaded.tokenizer, loaded.model
    config = generation_config(
        decoding, stop_token_ids=template.stop_token_ids, pad_token_id=pad_token_id(tokenizer, template)
    )
    budget = prompt_budget(model, decoding.max_new_tokens)
    history: list[Message] = []
    set_seed(seed)
    for line in lines:
        prompt = line.strip()
        if prompt in ("/exit", "/quit"):
            break
        if prompt == "/reset":
            history = []
            continue
        if not prompt:
            continue
        ids, dropped = fit_history(template, system, history, prompt, budget)
        if dropped:
            log.warning("history over the context: dropped the oldest %d turn pair(s)", dropped)
            history = history[2 * dropped :]
        # Beam search cannot stream (transformers refuses a streamer with num_beams > 1): print at the end.
        streamer = (
            TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if decoding.num_beams == 1 else None
        )
        (done,) = generate_ids(model, tokenizer, [ids], config, streamer=streamer)
        if streamer is None:
            print(done.text, flush=True)
        history += [Message(role="user", content=prompt), Message(role="assistant", content=done.text)]
    return history


def stdin_turns() -> Iterator[str]:
    """Lines of stdin, with a "> " prompt on stderr when a person is typing."""
    print("chat: one line per turn; /reset clears the history, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sft_stack.cli.generate", description=__doc__.split("\n\n")[0])
    add_model_flags(parser, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one user prompt")
    source.add_argument("--prompts-file", help="JSON lines {prompt, system?, reference?} or CSV prompt,output")
    source.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin, streamed")
    parser.add_argument("--system", help="system prompt (a file's own 'system' field wins)")
    parser.add_argument("--data", help="prepared data directory whose manifest names the template")
    add_decoding_flags(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--out", help="write rows as JSON lines here (default: stdout)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        decoding = decoding_from_args(args)
        rows = read_prompts(args.prompts_file) if args.prompts_file else None
        loaded = load_from_args(args)
        choice = template_from_args(loaded, args)
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"template: {choice.template.name} (from {choice.source})", file=sys.stderr)
    if args.chat:
        chat(loaded, choice.template, decoding, system=args.system, seed=args.seed, lines=stdin_turns())
        return 0
    if rows is None:
        rows = [{"prompt": args.prompt}]
    if args.system:
        rows = [{"system": args.system, **row} for row in rows]
    results = generate_rows(
        loaded.model,
        loaded.tokenizer,
        choice.template,
        rows,
        decoding,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=len(rows) > args.batch_size,
    )
    lines = [json.dumps(r, ensure_ascii=False) for r in results]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"wrote {len(lines)} rows to {args.out}", file=sys.stderr)
    elif args.prompt is not None:
        print(results[0]["output"])
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
