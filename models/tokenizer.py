"""Text ↔ ids for the byte-level models that ``train/`` trains.

Ids 0..255 are the UTF-8 bytes themselves; special tokens follow from 256 in the order given
(BERT's: [PAD] 256, [MASK] 257, [CLS] 258, [SEP] 259), the same ids as ``train/data.py``
gives them, so a model trained there decodes here.
"""

from __future__ import annotations

import numpy as np

BYTE_VOCAB_SIZE = 256
BERT_SPECIALS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as ids, then ``specials`` from id 256 on.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    array([104, 195, 169], dtype=int32)
    >>> tok.decode([104, 195, 169])
    'hé'
    """

    def __init__(self, specials: tuple[str, ...] = ()):
        self.specials = tuple(specials)
        if len(set(self.specials)) != len(self.specials):
            raise ValueError(f"`specials` must be distinct, got {self.specials}")
        self.vocab_size = BYTE_VOCAB_SIZE + len(self.specials)

    @classmethod
    def bert(cls) -> "ByteTokenizer":
        """The byte-level BERT's tokenizer: bytes, then [PAD], [MASK], [CLS], [SEP]."""
        return cls(BERT_SPECIALS)

    def token_id(self, special: str) -> int:
        if special not in self.specials:
            raise ValueError(f"unknown special token {special!r}; this tokenizer has {self.specials}")
        return BYTE_VOCAB_SIZE + self.specials.index(special)

    def encode(self, text: str | bytes) -> np.ndarray:
        """Ids [len(utf-8 bytes)] as int32 (bytes are taken as they are)."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, (bytes, bytearray)):
            raise ValueError(f"`text` must be a str or bytes, got {type(text).__name__}")
        return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32)

    def decode(self, ids, *, skip_specials: bool = True) -> str:
        """Ids (any 1-d sequence or array) → text; invalid UTF-8 becomes U+FFFD.

        Special tokens are dropped, or written as their names with ``skip_specials=False``.
        Ids outside the vocabulary are an error.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"`ids` must be a 1-d sequence of integer ids, got shape {ids.shape}, dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"`ids` holds {int(bad[0])}, outside the vocabulary [0, {self.vocab_size})")
        text, run = [], bytearray()
        for i in ids.tolist():
            if i < BYTE_VOCAB_SIZE:
                run.append(i)
                continue
            if not skip_specials:
                text.append(run.decode("utf-8", errors="replace"))
                text.append(self.specials[i - BYTE_VOCAB_SIZE])
                run = bytearray()
        text.append(run.decode("utf-8", errors="replace"))
        return "".join(text)
