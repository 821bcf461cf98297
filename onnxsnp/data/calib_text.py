"""Calibration arrays from a text file, tokenized with the model's own tokenizer (`tokenizers`).

One text per line, or JSONL records with a text field. Sequences are truncated to the model's
static sequence length, or to `max_length` where the sequence axis is dynamic, and padded to that
static length, or else to the longest sequence kept (padding is masked out of scoring, but costs
time)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibration import InputSpec, ObviousInput
from .kv_cache import is_past_cache
from ..errors import SnpError

TOKENIZER_FILE = "tokenizer.json"
# where a tokenizer.json without padding settings may have its pad token written down
_PAD_SOURCES = ("tokenizer_config.json", "special_tokens_map.json")
_PAD_GUESSES = ("[PAD]", "<pad>", "<|pad|>", "<|padding|>")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class TextCalibration:
    """`--calib-text`: where the texts are and how to read and tokenize them."""
    path: Path
    field: str = "text"
    tokenizer: Path | None = None  # a tokenizer.json or its folder; default: beside the model
    max_length: int = 128  # used where the model's sequence axis is dynamic


@dataclass(frozen=True)
class TokenInputs:
    """Which model inputs take token ids, the attention mask and token types (None: absent)."""
    ids: InputSpec
    mask: InputSpec | None
    types: InputSpec | None

    @classmethod
    def of(cls, specs: list[InputSpec]) -> TokenInputs:
        kinds = {spec.name: ObviousInput.of(spec) for spec in specs}
        candidates = [s for s in specs if s.dtype.kind in "iu" and len(s.shape) == 2 and kinds[s.name] is None]
        if len(candidates) != 1:
            found = "none" if not candidates else ", ".join(s.name for s in candidates)
            raise SnpError(f"--calib-text needs exactly one 2-D integer token-id input; the model has {found} "
                           f"(inputs: {', '.join(s.name for s in specs)})")
        others = [s for s in specs if s is not candidates[0] and kinds[s.name] is None and not is_past_cache(s)]
        if others:
            raise SnpError(f"--calib-text cannot fill model input(s) {', '.join(s.name for s in others)}; "
                           "use --calib FILE.npz")

        def first(kind: ObviousInput) -> InputSpec | None:
            return next((s for s in specs if kinds[s.name] is kind), None)

        return cls(candidates[0], first(ObviousInput.MASK), first(ObviousInput.TOKEN_TYPE))


def read_texts(path: Path, field: str) -> list[str]:
    """The non-empty texts of a file: lines, or JSONL records' `field` (a .jsonl/.ndjson file, or
    one whose first non-empty line is a JSON object)."""
    if not path.is_file():
        raise SnpError(f"calibration text file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise SnpError(f"calibration text file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise SnpError(f"cannot read {path}: {exc.strerror or exc}") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise SnpError(f"calibration text file {path} is empty")
    if path.suffix.lower() in _JSONL_SUFFIXES or _json_object(numbered[0][1]) is not None:
        return [_field(path, number, line, field) for number, line in numbered]
    return [line for _, line in numbered]


def _json_object(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _field(path: Path, number: int, line: str, field: str) -> str:
    record = _json_object(line)
    if record is None:
        raise SnpError(f"line {number} of {path} is not a JSON object (the file is read as JSONL)")
    if field not in record:
        raise SnpError(f"line {number} of {path} has no field {field!r} (it has {', '.join(record) or 'none'}); "
                       "choose one with --text-field")
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise SnpError(f"line {number} of {path}: field {field!r} is not a non-empty string")
    return value


def find_tokenizer(model_path: Path, given: Path | None) -> Path:
    if given is not None:
        path = given / TOKENIZER_FILE if given.is_dir() else given
        if not path.is_file():
            raise SnpError(f"tokenizer not found: {path}")
        return path
    path = model_path.parent / TOKENIZER_FILE
    if not path.is_file():
        raise SnpError(f"no {TOKENIZER_FILE} beside {model_path}; give the tokenizer with --tokenizer PATH")
    return path


def load_tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SnpError("--calib-text needs the tokenizers package: pip install 'onnxsnp[text]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exceptions for every kind of bad file
        detail = (str(exc).strip().splitlines() or ["unreadable"])[0][:200]
        raise SnpError(f"{path} is not a tokenizers tokenizer ({detail})") from None


def _pad_token(tokenizer, folder: Path) -> tuple[int, str]:
    """The pad token: the tokenizer's own padding settings, else its config files, else a usual name,
    else id 0 (padding is masked out where the model takes a mask)."""
    if tokenizer.padding:
        return tokenizer.padding["pad_id"], tokenizer.padding["pad_token"]
    for name in _PAD_SOURCES:
        try:
            token = json.loads((folder / name).read_text(encoding="utf-8")).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token), token
    for token in _PAD_GUESSES:
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token), token
    return 0, tokenizer.id_to_token(0) or "[PAD]"


def is_language_model(specs: list[InputSpec]) -> bool:
    """A model that takes a KV cache: a decoder LM, calibrated on windows of running text."""
    return any(is_past_cache(spec) for spec in specs)


def stream_windows(tokenizer, texts: list[str], length: int, count: int | None = None) -> np.ndarray:
    """A language model's calibration: the texts as one token stream (each text followed by a
    newline) cut into windows of `length` tokens, no padding; each window starts with the special
    tokens the tokenizer puts first (Gemma's <bos>; none for most Llama tokenizers). `count`
    windows spread evenly over the stream (all where None): a run of consecutive windows would
    cover only the first part of the texts."""
    probe = tokenizer.encode("a")
    prefix = []
    for token, special in zip(probe.ids, probe.special_tokens_mask):
        if not special:
            break
        prefix.append(token)
    stream = [token for encoded in tokenizer.encode_batch([text + "\n" for text in texts], add_special_tokens=False)
              for token in encoded.ids]
    body = length - len(prefix)
    usable = len(stream) // body if body > 0 else 0
    if usable == 0:
        raise SnpError(f"the calibration texts make {len(stream)} tokens, fewer than one window of {length}")
    chosen = usable if count is None else min(count, usable)
    starts = np.unique(np.linspace(0, usable - 1, chosen).round().astype(int)) * body
    return np.array([prefix + stream[start:start + body] for start in starts], np.int64)


def tokenize(request: TextCalibration, tokenizer_path: Path, texts: list[str], specs: list[InputSpec],
             vocabulary: int | None, windows: int | None = None) -> dict[str, np.ndarray]:
    """Token ids, and the mask and token types where the model takes them, keyed by input name; a
    model with a KV cache gets `windows` windows of the texts' token stream (stream_windows)."""
    inputs = TokenInputs.of(specs)
    tokenizer = load_tokenizer(tokenizer_path)
    static = inputs.ids.shape[1] if isinstance(inputs.ids.shape[1], int) and inputs.ids.shape[1] > 0 else None
    length = static or request.max_length
    if is_language_model(specs):  # windows of one token stream
        ids = stream_windows(tokenizer, texts, length, windows)
        _check_vocabulary(ids, vocabulary, tokenizer_path)
        arrays = {inputs.ids.name: ids}
        if inputs.mask is not None:
            arrays[inputs.mask.name] = np.ones_like(ids)
        return arrays
    pad_id, pad_token = _pad_token(tokenizer, tokenizer_path.parent)
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=static, pad_id=pad_id, pad_token=pad_token)
    encoded = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encoded])
    if ids.shape[1] == 0:
        raise SnpError(f"the tokenizer {tokenizer_path} makes no tokens from the texts in {request.path}")
    _check_vocabulary(ids, vocabulary, tokenizer_path)
    arrays = {inputs.ids.name: ids}
    if inputs.mask is not None:
        arrays[inputs.mask.name] = np.array([e.attention_mask for e in encoded])
    if inputs.types is not None:
        arrays[inputs.types.name] = np.array([e.type_ids for e in encoded])
    return arrays


def _check_vocabulary(ids: np.ndarray, vocabulary: int | None, tokenizer_path: Path) -> None:
    if vocabulary is not None and ids.max() >= vocabulary:
        raise SnpError(f"tokenizer {tokenizer_path} gives token id {ids.max()} but the model's embedding table "
                       f"has {vocabulary} rows: not this model's tokenizer")
