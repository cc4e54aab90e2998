"""The label value that carries no loss: shared by the chat templates that write labels, the shards that store
them and the trainer that reads them."""

IGNORE_INDEX = -100
"""Label value of tokens that carry no loss (prompt, system, padding). Matches torch's cross_entropy default."""
