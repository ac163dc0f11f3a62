"""A sentencepiece BPE tokenizer: training, a thin wrapper for encoding, and the `moe-lm tokenizer` command.

Choices that make `decode(encode(text)) == text` for any text, and make our ids equal the ids of
`transformers.AutoTokenizer.from_pretrained(dir)`:
- identity normalisation, no whitespace folding, byte fallback (any character survives as bytes);
- no dummy prefix (`add_dummy_prefix=False`, and `add_prefix_space=False` on the transformers side):
  with a prefix, sentencepiece and transformers disagree on text that starts with a space, and the
  decoder strips a space at the start of every decoded piece of a longer text;
- training sentences are lines without their newline, so no piece contains "\n" (it is always the
  byte token <0x0A>); hence encoding a text line by line gives exactly the ids of encoding it whole.
Special ids: <unk>=0, <s>=1, </s>=2 and no pad token: training packs documents into full blocks, so
nothing is padded; code that must pad uses `eos_id`.
Every tokenizer moe_lm trains carries moe_lm's default chat template (moe_lm/data/chat_template.py);
`moe-lm tokenizer chat-template DIR` shows or replaces a folder's template.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece as spm

from moe_lm.data.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    TEMPLATE_FILE,
    load_chat_template,
    write_chat_template,
)
from moe_lm.data.files import file_format, file_pieces, iter_texts, read_piece, resolve_files
from moe_lm.errors import ArgumentParser, UserError
from moe_lm.fsutil import replace_dir

if TYPE_CHECKING:
    from moe_lm.config import Config

MODEL_FILE = "tokenizer.model"
# What `train_tokenizer` writes; a directory holding anything else is not replaced.
_OUR_FILES = {MODEL_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", TEMPLATE_FILE}
# Lines are taken round-robin from the input files up to this count: about 50 MB of typical text,
# enough for a good BPE vocabulary while keeping training to seconds (1 MB trains in ~0.2 s).
MAX_TRAIN_LINES = 1_000_000
# sentencepiece silently drops longer sentences (its limit is in bytes), so long lines are cut.
_MAX_LINE_CHARS = 4096


class Tokenizer:
    """Encode/decode with a sentencepiece model; no BOS/EOS is added by `encode`."""

    def __init__(self, model_bytes: bytes, path: Path | None = None) -> None:
        self.path = path
        self.model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        # Identifies the tokenizer in data-cache keys: same bytes, same ids.
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `DIR/tokenizer.model` (or a `.model` file given directly)."""
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() or path.suffix != ".model" else path
        if not model.is_file():
            raise UserError(
                f"no tokenizer at '{path}' ({model} not found); train one with `moe-lm tokenizer train "
                f"--input FILE --vocab-size N --out {path}` or `moe-lm tokenizer ensure --config CONFIG`"
            )
        try:
            tok = cls(model.read_bytes(), model.parent)
        except (RuntimeError, OSError) as e:
            raise UserError(f"'{model}' is not a sentencepiece model ({e}); delete it and retrain") from None
        if tok.eos_id < 0:
            raise UserError(
                f"tokenizer '{model}' has no </s> token; retrain it with `moe-lm tokenizer train`"
            )
        return tok

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # one thread: parallelism comes from data.num_proc worker processes
        return self._sp.encode(list(texts), num_threads=1)  # type: ignore[no-any-return]

    def encode_offsets(self, text: str) -> list[tuple[int, int, int]]:
        """(id, first byte, end byte) of each token of `text`; a byte-fallback token before the last
        byte of its character is empty (first byte == end byte)."""
        pieces = self._sp.encode(text, return_type="proto").pieces
        return [(int(p.id), int(p.begin), int(p.end)) for p in pieces]

    def special_pieces(self) -> dict[str, int]:
        """The text of the control and unknown tokens (<s>, </s>, <unk>) -> id. sentencepiece encodes
        that text as characters; a chat template writes it to mean the token (as transformers reads it)."""
        sp = self._sp
        return {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}

    def template_variables(self) -> dict[str, str]:
        """What a chat template calls the special tokens (transformers' special_tokens_map)."""
        sp, names = self._sp, {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id}
        return {name: sp.id_to_piece(i) for name, i in names.items() if i >= 0}

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Text of `ids` (a list or a 1-D tensor); control tokens (<s>, </s>) decode to nothing."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return str(self._sp.decode([int(i) for i in ids]))

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[bytes, Path | None]]:
        # Rebuilt from the model bytes, so it can be shipped to worker processes.
        return (Tokenizer, (self.model_bytes, self.path))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


def _training_lines(texts: list[Iterator[str]]) -> Iterator[str]:
    """Non-empty lines without newlines, one from each input in turn (so every file is sampled)."""

    def lines_of(texts: Iterator[str]) -> Iterator[str]:
        for text in texts:
            for line in text.splitlines():
                for start in range(0, len(line), _MAX_LINE_CHARS):
                    yield line[start : start + _MAX_LINE_CHARS]

    iterators = [lines_of(t) for t in texts]
    count = 0
    while iterators and count < MAX_TRAIN_LINES:
        alive = []
        for it in iterators:
            line = next(it, None)
            if line is None:
                continue
            alive.append(it)
            if line:
                count += 1
                yield line
        iterators = alive


def _file_texts(files: list[Path], fmt: str, text_field: str, key: str) -> list[Iterator[str]]:
    # iter_texts opens and checks every file now, before sentencepiece consumes the lines.
    return [iter_texts(p, file_format(p, fmt, key), text_field, key) for p in files]


def _sp_train(lines: Iterable[str], vocab_size: int, where: str) -> bytes:
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,  # byte fallback covers rare characters; keep all seen ones whole
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,  # single-threaded BPE training is deterministic
            input_sentence_size=0,  # we already capped the input; no random sampling
            max_sentence_length=4 * _MAX_LINE_CHARS,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e)
        if m := re.search(r"Please set it to a value <= (\d+)", msg):
            raise UserError(
                f"vocab size {vocab_size} is too large for the text in {where} (at most {m.group(1)} "
                "tokens can be learned from it); lower the vocab size (--vocab-size or model.vocab_size) "
                "or add text"
            ) from None
        if m := re.search(r"required_chars\. (\d+) vs (\d+)", msg):
            raise UserError(
                f"vocab size {vocab_size} is too small for the text in {where}: it needs at least "
                f"{m.group(2)} (259 byte and special tokens + its distinct characters); raise the vocab size"
            ) from None
        if "sentences_.empty()" in msg:
            raise UserError(f"{where} holds no text to train a tokenizer on; pass non-empty files") from None
        raise
    return model.getvalue()


def _write_dir(model_bytes: bytes, out_dir: Path) -> None:
    """Write tokenizer.model plus the transformers files into `out_dir`, replacing it atomically."""
    from transformers import LlamaTokenizer  # slow import, only needed here

    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"tokenizer output '{out_dir}' is a file; choose a directory path")
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in _OUR_FILES)
        if other:
            raise UserError(
                f"'{out_dir}' holds files that are not a tokenizer ({', '.join(other[:3])}); choose an empty --out"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with tempfile.TemporaryDirectory() as src:
            (Path(src) / MODEL_FILE).write_bytes(model_bytes)
            # from_pretrained converts the .model into a tokenizers BPE (constructing LlamaTokenizer
            # with vocab_file= instead gives a 3-token vocabulary). add_prefix_space=False matches
            # add_dummy_prefix=False above.
            hf = LlamaTokenizer.from_pretrained(src, add_prefix_space=False, local_files_only=True)
        hf.save_pretrained(tmp)
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        cfg_path = tmp / "tokenizer_config.json"
        if cfg_path.is_file():  # drop load-time flags that would travel with the tokenizer to the Hub
            hf_cfg = json.loads(cfg_path.read_text())
            for k in ("local_files_only", "is_local"):
                hf_cfg.pop(k, None)
            cfg_path.write_text(json.dumps(hf_cfg, indent=2, ensure_ascii=False) + "\n")
        write_chat_template(tmp, DEFAULT_CHAT_TEMPLATE)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_tokenizer(
    inputs: list[str], vocab_size: int, out_dir: str | Path, *, fmt: str = "auto", text_field: str = "text"
) -> Path:
    """Train a byte-fallback BPE tokenizer on files/globs (text, JSON(L), parquet); returns `out_dir`.

    Deterministic: the same inputs and vocab size give the same tokenizer.model bytes.
    """
    files = resolve_files(inputs, "--input")
    empty = [p for p in files if p.stat().st_size == 0]
    if empty and len(empty) < len(files):  # as the token store does: a glob may match empty files
        print(f"--input: skipped {len(empty)} empty file(s)", file=sys.stderr)
        files = [p for p in files if p not in empty]
    where = f"'{files[0]}'" if len(files) == 1 else f"{len(files)} files ('{files[0]}', ...)"
    lines = _training_lines(_file_texts(files, fmt, text_field, "--input"))
    model_bytes = _sp_train(lines, vocab_size, where)
    out = Path(out_dir)
    _write_dir(model_bytes, out)
    return out


def _source_texts(cfg: Config) -> list[Iterator[str]]:
    """Texts of every training source: each file (empty ones skipped) and each dataset in turn."""
    from moe_lm.data.hf_sources import iter_dataset_texts
    from moe_lm.data.sources import data_plan

    texts: list[Iterator[str]] = []
    for spec in data_plan(cfg).train:
        if spec.chat:
            texts.append(_chat_texts(spec))
            continue
        if spec.dataset is not None:
            texts.append(iter_dataset_texts(spec.dataset, spec.streaming))
            continue
        files = [p for p in resolve_files(list(spec.files), spec.key) if p.stat().st_size > 0]
        texts += _file_texts(files, spec.fmt, spec.text_field, spec.key)
    return texts


def _chat_texts(spec: Any) -> Iterator[str]:
    """The messages' text of a chat source (records checked as for the store, template not needed)."""
    import dataclasses

    from moe_lm.data.chat import ChatSpec, contents
    from moe_lm.data.hf_sources import dataset_pieces, read_rows

    chat = ChatSpec(spec.messages_field)
    if spec.dataset is not None:
        rows = dataset_pieces(dataclasses.replace(spec.dataset, chat=chat))
        return contents(c for p in rows for batch, _, _ in read_rows(p) for c in batch)
    pieces = []
    for path in resolve_files(list(spec.files), spec.key):
        if path.stat().st_size:
            pieces += file_pieces(
                path, file_format(path, spec.fmt, spec.key), spec.text_field, spec.key, chat
            )
    return contents(c for p in pieces for batch, _, _ in read_piece(p) for c in batch)


def ensure_tokenizer(cfg: Config) -> Path:
    """The tokenizer directory of `cfg`, training one on the training sources first if it has none."""
    out = Path(cfg.data.tokenizer)
    if not (out / MODEL_FILE).is_file():
        size = cfg.model.vocab_size
        where = "data.sources" if cfg.data.sources else "data.train_files"
        texts = _source_texts(cfg)
        print(
            f"no tokenizer at {out}: training a {size}-token BPE tokenizer on {len(texts)} input(s) of {where}"
        )
        _write_dir(_sp_train(_training_lines(texts), size, where), out)
    return out


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The model's embedding must have a row for every token id (more rows are fine)."""
    n = tokenizer.vocab_size
    if n > model_vocab_size:
        raise UserError(
            f"tokenizer at {tokenizer.path} has {n} tokens but model.vocab_size = {model_vocab_size}; "
            f"set model.vocab_size={n} or retrain the tokenizer with --vocab-size {model_vocab_size}"
        )


def _chat_template_command(folder: Path, default: bool, file: str | None) -> int:
    """`moe-lm tokenizer chat-template DIR [--default | --file F]`."""
    from moe_lm.data.chat_template import ChatTemplateError

    if not (folder / MODEL_FILE).is_file() and not (folder / "tokenizer.json").is_file():
        raise UserError(f"'{folder}' holds no tokenizer (tokenizer.model or tokenizer.json)")
    if not default and file is None:
        template = load_chat_template(folder)
        if template is None:
            raise UserError(
                f"'{folder}' has no chat template; set one with --default or --file TEMPLATE.jinja"
            )
        print(template, end="" if template.endswith("\n") else "\n")
        return 0
    if file is not None and not Path(file).is_file():
        raise UserError(f"--file '{file}' not found")
    template = DEFAULT_CHAT_TEMPLATE if default else Path(file).read_text(encoding="utf-8")  # type: ignore[arg-type]
    try:
        write_chat_template(folder, template)
    except ChatTemplateError as e:
        raise UserError(f"--file '{file}': {e}; nothing was written") from None
    print(f"wrote the chat template of {folder} ({folder / TEMPLATE_FILE}, tokenizer_config.json)")
    return 0


def tokenizer_main(argv: list[str]) -> int:
    """`moe-lm tokenizer train|ensure ...`; raises UserError on bad input (the CLI prints it)."""
    parser = ArgumentParser(prog="moe-lm tokenizer", description="Train or check the BPE tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a sentencepiece BPE tokenizer on files")
    p_train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="files or globs")
    p_train.add_argument("--vocab-size", type=int, required=True)
    p_train.add_argument("--out", required=True, metavar="DIR")
    p_train.add_argument("--format", default="auto", choices=["auto", "text", "json", "parquet"])
    p_train.add_argument("--text-field", default="text", help="JSON/parquet field holding the text")
    p_ensure = sub.add_parser("ensure", help="train the config's tokenizer unless it exists; check its size")
    p_ensure.add_argument("--config", required=True)
    p_ensure.add_argument("overrides", nargs="*", help="key.sub=value")
    p_chat = sub.add_parser("chat-template", help="print a tokenizer folder's chat template, or set it")
    p_chat.add_argument("dir", metavar="DIR", help="a tokenizer folder (or a transformers model folder)")
    which = p_chat.add_mutually_exclusive_group()
    which.add_argument("--default", action="store_true", help="set moe_lm's default template")
    which.add_argument("--file", metavar="TEMPLATE.jinja", help="set the template in this Jinja file")
    args = parser.parse_args(argv)
    if args.command == "chat-template":
        return _chat_template_command(Path(args.dir), args.default, args.file)

    if args.command == "train":
        if args.vocab_size < 260:
            parser.error("--vocab-size must be at least 260 (3 special + 256 byte tokens + 1)")
        out = train_tokenizer(
            args.input, args.vocab_size, args.out, fmt=args.format, text_field=args.text_field
        )
        print(f"wrote a {Tokenizer.load(out).vocab_size}-token tokenizer to {out}")
        return 0

    from moe_lm.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = ensure_tokenizer(cfg)
    tok = Tokenizer.load(out)
    check_vocab(tok, cfg.model.vocab_size)
    print(f"tokenizer {out}: {tok.vocab_size} tokens (model.vocab_size = {cfg.model.vocab_size})")
    return 0


__all__ = ["Tokenizer", "check_vocab", "ensure_tokenizer", "tokenizer_main", "train_tokenizer"]
