"""Embedded training data: documents, tokenizers, a deterministic split, a token cache, and batch samplers.

Default corpus: the ``.py`` files of the running interpreter's standard library (``sysconfig``'s ``stdlib`` path;
``test/``, ``site-packages/`` and caches excluded), so nothing is downloaded. ``--data PATH`` takes a text file or a
folder of text files instead. Split: with 20 or more documents each document goes to validation when a hash of its
name falls under ``val_fraction`` (stable across machines and runs); with fewer, the last ``val_fraction`` of each
document is held out. Tokens are cached as ``.npz`` under the cache folder, keyed by the file list (names, sizes,
modification times), the tokenizer and the split.

Batches are functions of ``(seed, step)`` only, so a resumed run draws exactly the batches an uninterrupted run
would have drawn.

What cannot be a corpus — a missing path, a dangling link, a device such as /dev/null, a folder with no readable,
non-hidden, non-empty file, a split too short for one window — is a :class:`~train.config.ConfigError` naming
``data`` and the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.config import ConfigError

CACHE_VERSION = 1
BERT_SPECIALS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]")
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "__pycache__", "idle_test"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("ADASPLASH_CACHE", Path.home() / ".cache" / "adasplash_jax"))


# --------------------------------------------------------------------------------------------------- documents


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return root, sorted(files)


def check_data_path(data: str) -> None:
    """Refuses, naming the path, what cannot be a corpus: a missing path, a dangling link, a device such as
    /dev/null, an empty file or a folder without a readable non-empty, non-hidden file."""
    _path_files(Path(data))


def _path_files(path: Path) -> tuple[Path, list[Path]]:
    if path.is_symlink() and not path.exists():
        raise ConfigError("data", f"{path}: dangling symbolic link (to {os.readlink(path)})")
    if not path.exists():
        raise ConfigError("data", f"{path}: no such file or folder")
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        root, files = path, []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
            files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
        for f in files:
            if f.is_symlink() and not f.exists():
                raise ConfigError("data", f"{f}: dangling symbolic link (to {os.readlink(f)})")
        files = [f for f in files if f.is_file()]  # sockets, devices, fifos are no text
        if not files:
            raise ConfigError("data", f"{path}: no files to read (hidden files and folders are skipped)")
    else:
        raise ConfigError("data", f"{path}: not a regular file or a folder")
    for f in files:
        if not os.access(f, os.R_OK):
            raise ConfigError("data", f"{f}: not readable")
    if all(f.stat().st_size == 0 for f in files):
        what = "the file is" if path.is_file() else f"all {len(files)} files are"
        raise ConfigError("data", f"{path}: {what} empty")
    return root, sorted(files)


def list_documents(data: str | None) -> tuple[Path, list[Path]]:
    """(root, files): the corpus's files in a fixed order."""
    return _stdlib_files() if data is None else _path_files(Path(data))


def label_of(name: str) -> str:
    """Top-level package (first path component) of a document; files at the root share the label '<root>'."""
    parts = Path(name).parts
    return parts[0] if len(parts) > 1 else "<root>"


def is_val_document(name: str, val_fraction: float) -> bool:
    h = zlib.crc32(name.encode("utf-8")) / 2**32
    return h < val_fraction


# -------------------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """Bytes 0..255 are their own ids; special tokens follow (256, 257, ...)."""

    kind = "byte"

    def __init__(self, specials: tuple[str, ...] = ()):
        self.specials = tuple(specials)
        self.vocab_size = 256 + len(self.specials)

    def token_id(self, special: str) -> int:
        return 256 + self.specials.index(special)

    @property
    def regular_ids(self) -> tuple[int, int]:
        """[lo, hi) range of ordinary (non-special) ids, for random replacement in MLM."""
        return 0, 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def encode_many(self, docs: list[bytes]) -> list[np.ndarray]:
        return [self.encode(d) for d in docs]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return f"byte:{','.join(self.specials)}"


class BPETokenizer:
    """Byte-level BPE trained locally with the `tokenizers` library; special tokens take ids 0..k-1."""

    kind = "bpe"

    def __init__(self, tok, specials: tuple[str, ...] = ()):
        self.tok = tok
        self.specials = tuple(specials)
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts, vocab_size: int, specials: tuple[str, ...] = ()) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, specials)

    @classmethod
    def load(cls, path: Path, specials: tuple[str, ...] = ()) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), specials)

    def save(self, path: Path) -> None:
        self.tok.save(str(path))

    def token_id(self, special: str) -> int:
        return self.tok.token_to_id(special)

    @property
    def regular_ids(self) -> tuple[int, int]:
        return len(self.specials), self.vocab_size

    def encode_many(self, docs: list[bytes]) -> list[np.ndarray]:
        texts = [d.decode("utf-8", errors="replace") for d in docs]
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch(texts)]

    def encode(self, data: bytes) -> np.ndarray:
        return self.encode_many([data])[0]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return f"bpe:{self.vocab_size}:{','.join(self.specials)}"


# ------------------------------------------------------------------------------------------------------ corpus


@dataclass
class Corpus:
    """Tokenised documents, concatenated per split, with per-document offsets and labels."""

    tokenizer: object
    train: np.ndarray  # int32 [n_train_tokens]
    val: np.ndarray  # int32 [n_val_tokens]
    train_docs: np.ndarray  # int64 [n_train_docs, 2]: (start, end) into `train`
    val_docs: np.ndarray
    train_labels: list[str]
    val_labels: list[str]
    source: str
    cache_path: Path | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def _fingerprint(root: Path, files: list[Path], extra: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{root}|{extra}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _split_documents(root: Path, files: list[Path], val_fraction: float):
    """[(name, bytes, is_val)]: file-level hash split with ≥ 20 files, else the tail of each file."""
    docs = []
    by_file = len(files) >= 20
    for f in files:
        name = str(f.relative_to(root)) if f != root else f.name
        try:
            data = f.read_bytes()
        except OSError as e:
            raise ConfigError("data", f"{f}: cannot read ({e.strerror or e})") from None
        if not data:
            continue
        if by_file:
            docs.append((name, data, is_val_document(name, val_fraction)))
        else:
            cut = int(len(data) * (1 - val_fraction))
            docs.append((name, data[:cut], False))
            docs.append((name, data[cut:], True))
    return docs


def load_corpus(data: str | None = None, *, tokenizer: str = "byte", specials: tuple[str, ...] = (),
                val_fraction: float = 0.05, bpe_vocab_size: int = 2048, cache_dir: str | Path | None = None,
                log=print) -> Corpus:
    """Load (or build and cache) the tokenised corpus."""
    root, files = list_documents(data)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    extra = f"{tokenizer}|{bpe_vocab_size if tokenizer == 'bpe' else ''}|{','.join(specials)}|{val_fraction}"
    key = _fingerprint(root, files, extra)
    stem = "stdlib" if data is None else "data"
    path = cache / f"{stem}-{key}.npz"
    tok_path = cache / f"{stem}-{key}.tokenizer.json"
    source = f"Python {sysconfig.get_python_version()} stdlib ({root})" if data is None else str(data)

    tok = None
    if tokenizer == "bpe" and tok_path.exists():
        tok = BPETokenizer.load(tok_path, specials)
    elif tokenizer == "byte":
        tok = ByteTokenizer(specials)
    if path.exists() and tok is not None:
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
            return Corpus(tok, z["train"], z["val"], z["train_docs"], z["val_docs"], meta["train_labels"],
                          meta["val_labels"], source, path)
        except Exception as e:  # a damaged cache is rebuilt
            log(f"token cache {path} unreadable ({e!r}); rebuilding")

    docs = _split_documents(root, files, val_fraction)
    if not any(v for _, _, v in docs) or all(v for _, _, v in docs):
        side = "validation" if not any(v for _, _, v in docs) else "training"
        raise ConfigError("data", f"{data if data is not None else root}: the {side} split is empty "
                                  f"(val_fraction={val_fraction}, {len(files)} file(s)); add text or change val_fraction")
    if tokenizer == "bpe":
        log(f"training a byte-level BPE tokenizer (vocab {bpe_vocab_size}) on {source}")
        tok = BPETokenizer.train((d.decode("utf-8", errors="replace") for _, d, v in docs if not v),
                                 bpe_vocab_size, specials)
        tok.save(tok_path)
    log(f"tokenising {len(docs)} documents from {source}")
    encoded = tok.encode_many([d for _, d, _ in docs])

    def pack(is_val: bool):
        parts = [e for e, (_, _, v) in zip(encoded, docs) if v == is_val]
        labels = [label_of(n) for n, _, v in docs if v == is_val]
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        ends = np.cumsum(lengths)
        spans = np.stack([ends - lengths, ends], axis=1) if len(parts) else np.zeros((0, 2), np.int64)
        flat = np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)
        return flat, spans, labels

    train, train_docs, train_labels = pack(False)
    val, val_docs, val_labels = pack(True)
    meta = json.dumps({"train_labels": train_labels, "val_labels": val_labels, "source": source})
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, train=train, val=val, train_docs=train_docs, val_docs=val_docs, meta=np.array(meta))
    os.replace(tmp, path)
    log(f"cached {len(train):,} train / {len(val):,} validation tokens in {path}")
    return Corpus(tok, train, val, train_docs, val_docs, train_labels, val_labels, source, path)


# ---------------------------------------------------------------------------------------------------- sampling


def _rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, stream, step]))


TRAIN, VAL = 0, 1


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return tokens[starts[:, None] + np.arange(length)[None, :]]


class LMBatches:
    """Causal LM: windows of seq_len + 1 tokens; inputs are the first seq_len, targets the next token."""

    def __init__(self, corpus: Corpus, seq_len: int, seed: int):
        for split, toks in (("train", corpus.train), ("validation", corpus.val)):
            if len(toks) <= seq_len + 1:
                raise ConfigError("data", f"{corpus.source}: the {split} split has {len(toks)} tokens; a window "
                                          f"needs more than seq_len + 1 = {seq_len + 1}: use more text or a "
                                          "smaller --seq-len")
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed

    def _make(self, tokens, starts):
        w = _windows(tokens, starts, self.seq_len + 1)
        return {"input_ids": w[:, :-1], "targets": w[:, 1:], "weights": np.ones(w[:, 1:].shape, np.float32)}

    def train_batch(self, step: int, batch_size: int) -> dict:
        toks = self.corpus.train
        starts = _rng(self.seed, step, TRAIN).integers(0, len(toks) - self.seq_len - 1, size=batch_size)
        return self._make(toks, starts)

    def val_batch(self, index: int, batch_size: int, num_batches: int) -> dict:
        """Evenly spaced windows over the validation split (the same every evaluation)."""
        toks = self.corpus.val
        n = batch_size * num_batches
        all_starts = np.linspace(0, len(toks) - self.seq_len - 1, n).astype(np.int64)
        return self._make(toks, all_starts[index * batch_size:(index + 1) * batch_size])


class MLMBatches:
    """BERT masked LM: [CLS] + seq_len - 1 tokens; mlm_prob of the positions are predicted (80% [MASK], 10% a
    random token, 10% unchanged)."""

    def __init__(self, corpus: Corpus, seq_len: int, seed: int, mlm_prob: float):
        self.lm = LMBatches(corpus, seq_len - 1, seed)
        self.corpus, self.seq_len, self.seed, self.p = corpus, seq_len, seed, mlm_prob
        tok = corpus.tokenizer
        self.cls, self.mask = tok.token_id("[CLS]"), tok.token_id("[MASK]")
        self.lo, self.hi = tok.regular_ids

    def _mask(self, body: np.ndarray, rng: np.random.Generator) -> dict:
        b, t = body.shape
        picked = rng.random((b, t)) < self.p
        r = rng.random((b, t))
        inputs = np.where(picked & (r < 0.8), self.mask, body)
        random_tok = rng.integers(self.lo, self.hi, size=(b, t))
        inputs = np.where(picked & (r >= 0.8) & (r < 0.9), random_tok, inputs)
        cls = np.full((b, 1), self.cls, np.int32)
        return {
            "input_ids": np.concatenate([cls, inputs.astype(np.int32)], axis=1),
            "targets": np.concatenate([np.zeros_like(cls), body], axis=1),
            "weights": np.concatenate([np.zeros((b, 1), np.float32), picked.astype(np.float32)], axis=1),
        }

    def train_batch(self, step: int, batch_size: int) -> dict:
        body = self.lm.train_batch(step, batch_size)["input_ids"]
        return self._mask(body, _rng(self.seed, step, 2))

    def val_batch(self, index: int, batch_size: int, num_batches: int) -> dict:
        body = self.lm.val_batch(index, batch_size, num_batches)["input_ids"]
        return self._mask(body, _rng(self.seed, index, 3))


class ClassifyBatches:
    """Sequence classification: which top-level package a snippet comes from. [CLS] + up to seq_len - 1 tokens
    from one document; shorter documents are padded with [PAD] (attention_mask 0). Classes: the `num_labels`
    packages with the most training tokens among those that also have validation documents; classes are drawn
    uniformly, documents in proportion to their length."""

    def __init__(self, corpus: Corpus, seq_len: int, seed: int, num_labels: int):
        tok = corpus.tokenizer
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed
        self.cls, self.pad = tok.token_id("[CLS]"), tok.token_id("[PAD]")
        size: dict[str, int] = {}
        for (s, e), lab in zip(corpus.train_docs, corpus.train_labels):
            size[lab] = size.get(lab, 0) + int(e - s)
        val_labels = set(corpus.val_labels)
        ranked = sorted((lab for lab in size if lab in val_labels and lab != "<root>"), key=lambda k: (-size[k], k))
        if len(ranked) < num_labels:
            raise ValueError(f"num_labels: the corpus has only {len(ranked)} packages with both train and "
                             f"validation documents ({ranked}); need {num_labels}")
        self.classes = sorted(ranked[:num_labels])
        self.index = {c: i for i, c in enumerate(self.classes)}

        def group(docs, labels):
            out = [[] for _ in self.classes]
            for (s, e), lab in zip(docs, labels):
                if lab in self.index and e > s:
                    out[self.index[lab]].append((int(s), int(e)))
            return [np.array(g, dtype=np.int64) for g in out]

        self.train_groups = group(corpus.train_docs, corpus.train_labels)
        self.val_groups = group(corpus.val_docs, corpus.val_labels)

    def _snippet(self, tokens, docs, rng):
        lengths = docs[:, 1] - docs[:, 0]
        d = rng.choice(len(docs), p=lengths / lengths.sum())
        s, e = docs[d]
        n = self.seq_len - 1
        start = s + rng.integers(0, max(1, e - s - n + 1))
        piece = tokens[start:min(e, start + n)]
        ids = np.full(self.seq_len, self.pad, np.int32)
        ids[0] = self.cls
        ids[1:1 + len(piece)] = piece
        mask = np.zeros(self.seq_len, np.int32)
        mask[:1 + len(piece)] = 1
        return ids, mask

    def _batch(self, tokens, groups, rng, batch_size, labels=None):
        if labels is None:
            labels = rng.integers(0, len(self.classes), size=batch_size)
        ids, masks = zip(*(self._snippet(tokens, groups[c], rng) for c in labels))
        return {"input_ids": np.stack(ids), "attention_mask": np.stack(masks),
                "targets": np.asarray(labels, np.int32), "weights": np.ones(batch_size, np.float32)}

    def train_batch(self, step: int, batch_size: int) -> dict:
        return self._batch(self.corpus.train, self.train_groups, _rng(self.seed, step, 4), batch_size)

    def val_batch(self, index: int, batch_size: int, num_batches: int) -> dict:
        labels = (np.arange(batch_size) + index * batch_size) % len(self.classes)  # balanced
        return self._batch(self.corpus.val, self.val_groups, _rng(self.seed, index, 5), batch_size, labels)
