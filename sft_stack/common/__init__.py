"""Helpers every package uses (launcher, trainer, data_pipeline, tracking, tools): nothing here imports them."""
