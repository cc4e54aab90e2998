"""sft-stack's own namespace: the command-line tools (``sft_stack.cli``), the helpers shared by every package
(``sft_stack.common``) and the chain-of-thought demo (``sft_stack.demo``). Keeping them under one project-named
package means installing the project adds no generic top-level names (``cli``, ``common``, ``demo``) to a
user's environment; ``launcher``, ``trainer``, ``data_pipeline`` and ``tracking`` are the design's own floors.
"""
