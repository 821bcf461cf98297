"""Calibration from raw data: --calib-text through a real `tokenizers` tokenizer and
--calib-images through Hugging Face-style preprocessing, end to end on tiny exported models; the
obvious inputs filled in; and every mismatch a one-line error with nothing written."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import ROOT
from exports import export, export_vit
from onnxsnp.data.calib_data import ImageCalibration, TextCalibration, load_raw_calibration
from onnxsnp.data.calib_images import IMAGENET_MEAN, IMAGENET_STD, ImageInput, Resize, ResizeKind, preprocessing_for
from onnxsnp.data.calibration import FilledInputWarning, InputSpec, input_specs, validate_calibration
from onnxsnp.cli import main
from onnxsnp.errors import SnpError
from onnxsnp.ir.graph import ModelGraph

torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")
Image = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.slow  # every model here is exported with torch

VOCAB = 200  # rows of the tiny BERT's embedding table; the test tokenizer stays below it
SEQ_LIMIT = 64  # tiny_bert's position table
SENTENCES = [
    "the pruned model keeps the attention scores of the original",
    "query and key neurons are removed in pairs",
    "a small vision transformer reads digits",
    "value neurons and feed forward neurons go too",
    "calibration data comes from real text",
    "onnx runtime runs the model before it is written",
    "the tokenizer splits words into pieces",
    "short line",
    "images are resized, cropped, rescaled and normalized",
    "every head keeps the same number of neurons",
    "deployment engineers prune exported models",
    "the output file is written atomically",
]


def train_tokenizer(path, vocab: int = VOCAB, corpus=SENTENCES):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=vocab, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.save(str(path))
    return tok


class Encoder(torch.nn.Module):
    """A tiny BERT taking token types (and position ids) as inputs too, as many exports do."""

    def __init__(self, positions: bool):
        super().__init__()
        from torch_models import tiny_bert

        self.bert, self.positions = tiny_bert("eager", layers=2, vocab=VOCAB), positions

    def forward(self, input_ids, attention_mask, token_type_ids, position_ids=None):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                         position_ids=position_ids).last_hidden_state


def export_text_model(folder, positions: bool = False, static: int | None = None):
    """model.onnx with tokenizer.json beside it; static: a fixed sequence length."""
    folder.mkdir(exist_ok=True)
    names = ["input_ids", "attention_mask", "token_type_ids"] + (["position_ids"] if positions else [])
    length = static or 8
    ids = torch.randint(0, VOCAB, (2, length))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    args += (torch.arange(length).expand(2, -1),) if positions else ()
    axes = {n: {0: "batch"} if static else {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]}
    export(Encoder(positions), args, folder / "model.onnx", names, ["last_hidden_state"], axes, "legacy")
    train_tokenizer(folder / "tokenizer.json")
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return export_text_model(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def vit_model(tmp_path_factory):
    """The tiny ViT (3×32×32 input, dynamic batch) in a folder of its own."""
    return export_vit(tmp_path_factory.mktemp("vit") / "model.onnx", "manual", True)


def write_images(folder, count: int = 12, seed: int = 0):
    """PNG and JPEG files of varied sizes and modes (RGB, grayscale, RGBA), in class sub-folders."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "RGBA"]
    paths = []
    for i in range(count):
        height, width = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        mode = modes[i % 3]
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"img{i}.png" if i % 2 else f"img{i}.jpg")
        (image.convert("RGB") if path.suffix == ".jpg" and mode == "RGBA" else image).save(path)
        paths.append(path)
    return sorted(paths)


def raw(model_path, request, samples: int = 64, seed: int = 0):
    return load_raw_calibration(model_path, ModelGraph(onnx.load(str(model_path))), request, samples, seed)


# --- text --------------------------------------------------------------------------------------

def test_text_file_tokenized_padded_to_the_longest_and_masked(text_model, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES[:8]) + "\n\n")  # blank lines are skipped
    result = raw(text_model, TextCalibration(texts))
    tok = tokenizers.Tokenizer.from_file(str(text_model.parent / "tokenizer.json"))
    encoded = [tok.encode(s).ids for s in SENTENCES[:8]]
    longest = max(len(e) for e in encoded)
    ids, mask, types = (result.arrays[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert ids.shape == mask.shape == types.shape == (8, longest)
    for row, expected in enumerate(encoded):
        assert ids[row, :len(expected)].tolist() == expected
        assert (ids[row, len(expected):] == tok.token_to_id("[PAD]")).all()
        assert mask[row].tolist() == [1] * len(expected) + [0] * (longest - len(expected))
    assert (types == 0).all()
    assert "texts.txt" in result.label and "tokenizer.json" in result.label


def test_a_language_models_windows_cover_the_token_stream_evenly_each_after_the_tokenizers_prefix(tmp_path):
    from onnxsnp.data.calib_text import stream_windows

    tok = train_tokenizer(tmp_path / "tokenizer.json")
    texts = SENTENCES * 4
    stream = [t for e in tok.encode_batch([text + "\n" for text in texts], add_special_tokens=False) for t in e.ids]
    cls, length = tok.token_to_id("[CLS]"), 9
    body = length - 1  # the [CLS] the post-processor puts first starts every window; [SEP] (last) does not
    every = stream_windows(tok, texts, length)
    assert every.shape == (len(stream) // body, length) and (every[:, 0] == cls).all()
    assert every[:, 1:].reshape(-1).tolist() == stream[:len(every) * body]  # no padding, nothing skipped
    three = stream_windows(tok, texts, length, count=3)  # the first, the middle and the last window
    middle = [k for k in range(len(every)) if (three[1] == every[k]).all()]
    assert (three[0] == every[0]).all() and (three[2] == every[-1]).all()
    assert len(middle) == 1 and abs(middle[0] - (len(every) - 1) / 2) <= 0.5
    with pytest.raises(SnpError, match="fewer than one window"):
        stream_windows(tok, ["short line"], 64)


def test_max_length_truncates_and_samples_are_a_seeded_choice(text_model, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES))
    first = raw(text_model, TextCalibration(texts, max_length=6), samples=5, seed=3).arrays["input_ids"]
    again = raw(text_model, TextCalibration(texts, max_length=6), samples=5, seed=3).arrays["input_ids"]
    other = raw(text_model, TextCalibration(texts, max_length=6), samples=5, seed=4).arrays["input_ids"]
    assert first.shape == (5, 6) and np.array_equal(first, again) and not np.array_equal(first, other)


def test_jsonl_field_and_static_sequence_length(tmp_path):
    model = export_text_model(tmp_path / "static", static=16)
    records = tmp_path / "data.jsonl"
    records.write_text("\n".join(json.dumps({"id": i, "sentence": s}) for i, s in enumerate(SENTENCES[:6])))
    arrays = raw(model, TextCalibration(records, field="sentence", max_length=4)).arrays
    assert arrays["input_ids"].shape == (6, 16)  # the model's length wins over --max-length


def test_cli_prunes_with_text_calibration_and_fills_position_ids(tmp_path, capsys):
    model = export_text_model(tmp_path / "pos", positions=True)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES))
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    assert main([str(model), str(out), "--calib-text", str(texts), "--max-length", "24", "--calib-samples", "10",
                 "--report", str(report)]) == 0
    captured = capsys.readouterr()
    assert "position_ids = 0..L-1" in captured.err and "token_type_ids" not in captured.err
    data = json.loads(report.read_text())
    assert data["calibration"].startswith(str(texts))
    assert data["calibration_samples"] + data["holdout_samples"] == 10
    onnx.checker.check_model(onnx.load(str(out)))


def test_npz_without_token_types_is_accepted_with_a_note(text_model):
    specs = input_specs(ModelGraph(onnx.load(str(text_model))))
    ids = np.random.default_rng(0).integers(0, VOCAB, (4, 7))
    with pytest.warns(FilledInputWarning, match="attention_mask = ones, token_type_ids = zeros"):
        feed = validate_calibration({"input_ids": ids}, specs, "test arrays")
    assert feed["attention_mask"].shape == feed["token_type_ids"].shape == (4, 7)
    assert (feed["attention_mask"] == 1).all() and (feed["token_type_ids"] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to fill: no note
        validate_calibration({"input_ids": ids, "attention_mask": np.ones_like(ids),
                              "token_type_ids": np.zeros_like(ids)}, specs, "test arrays")


def test_position_ids_are_a_range():
    specs = [InputSpec("input_ids", np.dtype(np.int64), ("b", "s")),
             InputSpec("position_ids", np.dtype(np.int64), ("b", "s"))]
    with pytest.warns(FilledInputWarning):
        feed = validate_calibration({"input_ids": np.zeros((3, 5), np.int64)}, specs, "test arrays")
    assert feed["position_ids"].tolist() == [list(range(5))] * 3


# --- images ------------------------------------------------------------------------------------

def _hf_pixels(processor, paths, mode: str = "RGB") -> np.ndarray:
    images = [Image.open(p).convert(mode) for p in paths]
    return processor(images=images, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("processor_name, settings", [
    ("ViTImageProcessor", dict(size={"height": 32, "width": 32}, resample=2)),
    ("DeiTImageProcessor", dict(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32},
                                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), resample=3)),
    ("CLIPImageProcessor", dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
    ("ConvNextImageProcessor", dict(size={"shortest_edge": 32}, crop_pct=0.875)),
])
def test_preprocessing_matches_hugging_face(vit_model, tmp_path, processor_name, settings):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(vit_model, folder / "model.onnx")
    processor = getattr(transformers, processor_name)(**settings)
    processor.save_pretrained(str(folder))
    paths = write_images(tmp_path / "images", count=6)
    ours = raw(folder / "model.onnx", ImageCalibration(tmp_path / "images"))
    np.testing.assert_allclose(ours.arrays["pixel_values"], _hf_pixels(processor, paths), atol=1e-4)
    assert "preprocessor_config.json" in ours.label


def test_flags_without_a_config(vit_model, tmp_path):
    paths = write_images(tmp_path / "images", count=4)
    request = ImageCalibration(tmp_path / "images", resize=Resize(ResizeKind.EXACT, 32, 32), mean=(0.5,), std=(0.25,),
                               scale=1 / 100, resample="nearest")
    arrays = raw(vit_model, request).arrays["pixel_values"]
    expected = np.stack([(np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.NEAREST), np.float32) / 100
                          - 0.5) / 0.25 for p in paths]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(arrays, expected, atol=1e-5)


def test_defaults_use_the_model_size_and_imagenet_statistics(vit_model, tmp_path):
    write_images(tmp_path / "images", count=3)
    image_input = ImageInput.of(input_specs(ModelGraph(onnx.load(str(vit_model)))))
    with pytest.warns(UserWarning, match="ImageNet"):
        pre = preprocessing_for(vit_model, ImageCalibration(tmp_path / "images"), image_input)
    assert (pre.resize, pre.mean, pre.std, pre.scale) == (Resize(ResizeKind.EXACT, 32, 32), IMAGENET_MEAN,
                                                         IMAGENET_STD, 1 / 255)


def test_cli_prunes_with_image_calibration(vit_model, tmp_path):
    """The real command line, in a process of its own."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(vit_model, folder / "model.onnx")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    write_images(tmp_path / "images", count=12)
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "onnxsnp", str(folder / "model.onnx"), str(out), "--calib-images",
                           str(tmp_path / "images"), "--report", str(report), "-q"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["calibration_samples"] + data["holdout_samples"] == 12
    assert "resize 32x32" in data["calibration"] and data["flops_after"] < data["flops_before"]


# --- every mismatch: exit 2, one line, nothing written ----------------------------------------

def _four_channel_model(path):
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 4, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 32, 32])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["y"])], "g", [x],
                                                  [y])), str(path))
    return path


def _bad_cases(text_model, vit_model, tmp):
    """(model, extra arguments) per mismatch, with the files they need written into tmp."""
    texts = tmp / "texts.txt"
    texts.write_text("\n".join(SENTENCES))
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp / "nofield.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp / "notjson.jsonl").write_text('{"text": "a"}\nplain\n')
    (tmp / "bad_tokenizer.json").write_text('{"not": "a tokenizer"}')
    bare = tmp / "bare"
    bare.mkdir()
    shutil.copy(text_model, bare / "model.onnx")
    big = tmp / "big_vocab"
    big.mkdir()
    words = {"[UNK]": 0, "[PAD]": 1} | {f"word{i}": i for i in range(2, 2 * VOCAB)}  # a larger vocabulary
    tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]")).save(str(big / "tokenizer.json"))
    images = tmp / "images"
    write_images(images, count=3)
    (tmp / "no_images").mkdir()
    (tmp / "no_images" / "notes.txt").write_text("not an image")
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    wide = tmp / "wide_config"
    wide.mkdir()
    shutil.copy(vit_model, wide / "model.onnx")
    (wide / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 40, "width": 40}}))
    numbered = tmp / "numbered.txt"
    numbered.write_text("\n".join(f"word{i}" for i in range(VOCAB - 10, VOCAB + 10)))
    cases = {
        "no tokenizer beside the model": (bare / "model.onnx", ["--calib-text", str(texts)]),
        "tokenizer path missing": (text_model, ["--calib-text", str(texts), "--tokenizer", str(tmp / "nope.json")]),
        "not a tokenizer": (text_model, ["--calib-text", str(texts), "--tokenizer", str(tmp / "bad_tokenizer.json")]),
        "tokenizer of another vocabulary": (text_model, ["--calib-text", str(numbered), "--tokenizer", str(big)]),
        "empty text file": (text_model, ["--calib-text", str(tmp / "empty.txt")]),
        "missing text file": (text_model, ["--calib-text", str(tmp / "nope.txt")]),
        "not UTF-8": (text_model, ["--calib-text", str(tmp / "latin1.txt")]),
        "JSONL field missing": (text_model, ["--calib-text", str(tmp / "nofield.jsonl")]),
        "JSONL line not JSON": (text_model, ["--calib-text", str(tmp / "notjson.jsonl")]),
        "text on an image model": (vit_model, ["--calib-text", str(texts)]),
        "images on a text model": (text_model, ["--calib-images", str(images)]),
        "no images": (vit_model, ["--calib-images", str(tmp / "no_images")]),
        "missing folder": (vit_model, ["--calib-images", str(tmp / "nope")]),
        "unreadable image": (vit_model, ["--calib-images", str(broken)]),
        "four channels": (_four_channel_model(tmp / "four.onnx"), ["--calib-images", str(images)]),
        "mean of the wrong length": (vit_model, ["--calib-images", str(images), "--image-mean", "0.5,0.5"]),
        "config size not the model's": (wide / "model.onnx", ["--calib-images", str(images)]),
        "shortest edge leaves sizes apart": (vit_model, ["--calib-images", str(images), "--image-size", "32"]),
        "bad size": (vit_model, ["--calib-images", str(images), "--image-size", "big"]),
        "zero std": (vit_model, ["--calib-images", str(images), "--image-std", "0"]),
        "two sources": (text_model, ["--calib-text", str(texts), "--calib", str(tmp / "c.npz")]),
        "image flag without images": (vit_model, ["--image-size", "32"]),
        "text flag without text": (text_model, ["--tokenizer", str(big)]),
        "max length zero": (text_model, ["--calib-text", str(texts), "--max-length", "0"]),
    }
    assert list(cases) == BAD
    return cases


BAD = ["no tokenizer beside the model", "tokenizer path missing", "not a tokenizer", "tokenizer of another vocabulary",
       "empty text file", "missing text file", "not UTF-8", "JSONL field missing", "JSONL line not JSON",
       "text on an image model", "images on a text model", "no images", "missing folder", "unreadable image",
       "four channels", "mean of the wrong length", "config size not the model's", "shortest edge leaves sizes apart",
       "bad size", "zero std", "two sources", "image flag without images", "text flag without text",
       "max length zero"]


@pytest.fixture(scope="module")
def bad_cases(text_model, vit_model, tmp_path_factory):
    return _bad_cases(text_model, vit_model, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", BAD)
def test_mismatch_is_one_line_and_nothing_is_written(bad_cases, tmp_path, capsys, case):
    model, extra = bad_cases[case]
    out = tmp_path / "out.onnx"
    assert main([str(model), str(out), "-q"] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxsnp: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module, flag", [("tokenizers", "--calib-text"), ("PIL", "--calib-images")])
def test_missing_optional_package_is_one_line(text_model, vit_model, tmp_path, capsys, monkeypatch, module, flag):
    source = tmp_path / "data"
    if flag == "--calib-text":
        source.write_text("a text\n")
        model = text_model
    else:
        write_images(source, count=2)
        model = vit_model
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    assert main([str(model), str(tmp_path / "out.onnx"), flag, str(source), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'onnxsnp[" in err
    assert not (tmp_path / "out.onnx").exists()
