"""A tiny word-level tokenizer made offline with `tokenizers`, sized for conftest's tiny models (vocab 97)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "the a of is what who where when capital city river moon sun red blue green one two three "
    "tell me about answer question user assistant : ? . ,"
).split()

# A minimal chat template in the usual shape: user turn, then the assistant header.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def tiny_tokenizer(vocab_size: int = 97, chat: bool = False) -> PreTrainedTokenizerFast:
    words = ["<pad>", "<unk>", "<s>", "</s>"] + WORDS
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )
    if chat:
        t.chat_template = CHAT_TEMPLATE
    return t
