"""The command-line tools a person runs, apart from the code that runs inside a training rank (trainer/).

    python -m sft_stack.cli.generate   decode from a trained model: a prompt, a prompts file, or a chat
    python -m sft_stack.cli.evaluate   loss/perplexity on a prepared split and generation metrics on references
    python -m sft_stack.cli.export     export a checkpoint or merge an adapter into plain Hugging Face directories

sft_stack/cli/flags.py defines the flags these tools share once. The tools import the trainer's libraries; nothing in
trainer/ imports cli/.
"""
