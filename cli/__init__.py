"""The command-line tools a person runs, apart from the code that runs inside a training rank (trainer/).

    python -m cli.generate   decode from a trained model: a prompt, a prompts file, or a chat
    python -m cli.evaluate   loss/perplexity on a prepared split and generation metrics on references
    python -m cli.export     export a checkpoint or merge an adapter into plain Hugging Face directories

cli/flags.py defines the flags these tools share once. The tools import the trainer's libraries; nothing in
trainer/ imports cli/.
"""
