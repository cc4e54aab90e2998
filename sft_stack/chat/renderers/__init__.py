"""One module per chat format, each a ``Renderer`` subclass listed in ``sft_stack/chat/registry.py``."""
