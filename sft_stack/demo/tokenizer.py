"""A character-level tokenizer trained with the ``tokenizers`` library, saved as a normal fast tokenizer dir.

One token per character keeps every digit its own token, so column arithmetic is the same operation in every
number; the vocabulary is whatever characters the training corpus holds (a few hundred), plus four special
tokens. Characters it never saw (a held-out name, say) become ``<unk>``. The directory loads with
``AutoTokenizer.from_pretrained`` like any other and is what ``prepare``, training and generation read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_char_tokenizer(texts: Iterable[str], out_dir: Path) -> Path:
    """Train on ``texts`` and save to ``out_dir`` (tokenizer.json + tokenizer_config.json); returns ``out_dir``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    # Every character (newlines included) is its own pre-token, so each word of the WordLevel vocabulary is one
    # character; Fuse joins decoded characters back without spaces.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS.values()), min_frequency=1)
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
