"""The command-line tools a person runs, apart from the code that runs inside a training rank (trainer/).

    sft <command> ...                  main.py: one console script naming every tool below
    sft train CONFIG                   train.py: the deepspeed launcher line on launcher/run.py
    sft configs [cp NAME DEST]         configs.py: the shipped recipes
    sft convert SRC DST | sft plan     convert.py, plan.py: the commands over trainer/convert and trainer/plan.py
    sft generate | chat | evaluate     generate.py, evaluate.py: decoding, loss and generation metrics
    sft export                         export.py: a checkpoint or an adapter into plain Hugging Face directories

``sft prepare|verify|inspect|merge`` are data_pipeline/cli.py and ``sft dashboard|sync`` tracking/cli.py, named by
main.py. flags.py defines the flags the model tools share once. The tools import the trainer's libraries; nothing
in trainer/ imports this package (``python -m trainer.convert`` and ``python -m trainer.plan`` exec it instead).
"""
