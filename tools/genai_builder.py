"""onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder`, same arguments),
reading a folder that transformers 5 wrote for Gemma 3.

transformers 5 keeps Gemma 3's two rotary bases per layer type (`rope_parameters = {"full_attention":
{...}, "sliding_attention": {...}}`); onnxruntime-genai 0.18's builder reads the flat form of
transformers 4 (`rope_parameters["rope_type"]`, `rope_local_base_freq`) and stops with KeyError
'rope_type'. The config is handed to it in that form; a flat config passes unchanged."""
from __future__ import annotations

import runpy
import sys

import transformers


def _flat_rope(config):
    text = getattr(config, "text_config", None) or config
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        text.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        text.rope_parameters = dict(rope["full_attention"])
        text.rope_theta = text.rope_parameters["rope_theta"]
    return config


def main() -> None:
    load = transformers.AutoConfig.from_pretrained
    transformers.AutoConfig.from_pretrained = lambda *args, **kwargs: _flat_rope(load(*args, **kwargs))
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


if __name__ == "__main__":
    main()
