"""Chat formats: the conversation model and the templates that turn it into token ids and labels.

Below ``data_pipeline`` (which renders corpora into shards) and ``trainer`` (which renders generation prompts),
so both render a conversation the same way; it imports neither, only ``sft_stack.common``.

- ``conversation``: the normalized records (``Conversation``, ``Message``, ``ToolCall``, ``Text``, ``Reject``)
  and ``InputError``.
- ``templates``: the API. ``resolve_template(name, tokenizer) -> ChatTemplate``; ``encode_batch`` /
  ``encode_batch_arrays`` (ids and labels), ``encode_prompt``, ``encode_text_batch``; ``fit_length``.
- ``registry``: the formats by name (``RENDERERS``, ``TEMPLATE_NAMES``, ``register``).
- ``renderer``: the ``Renderer`` base class and what a render lays out (``Layout``, ``Joined`` parts).
- ``vocab``: what a format needs from a tokenizer (``Vocab``), and plain-text encoding (``TextEncoder``).
- ``tools``: helpers the tool formats share.
- ``renderers/``: one module per format.

The per-format interface
------------------------
A format is a ``Renderer`` subclass in its own module under ``renderers/``, and one line in
``registry.RENDERERS`` (a format defined elsewhere calls ``registry.register(name, cls)`` instead):

- ``__init__(self, v: Vocab)``: call ``super().__init__(v)`` (it sets ``bos``, ``eos`` and
  ``stop_token_ids = (eos,)``), then look the format's tokens up once: ``v.control("<|im_start|>")`` for a
  token the vocabulary must have (else InputError naming the tokenizer), ``v.marker(text)`` for one that may be
  text, ``v.literal(text)`` for constant template text. Set ``stop_token_ids`` to what ends an assistant turn.
- ``tool_format``: True when ``render`` lays out tools, calls and results; the others reject tool use.
- ``render(messages, trained, tools) -> Layout``: the parts in order, each ``out.add(part, is_trained)``.
  Message text goes in as ``str`` (tokenized as plain text: control strings in it stay text); the assistant's
  text and what closes it are trained when ``trained[i]``. A prompt (messages ending with a user or tool turn)
  ends with the assistant prefix. Raise ``UnrenderableError`` for content the format cannot express.
"""
