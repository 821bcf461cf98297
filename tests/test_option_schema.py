"""onnxsnp/option_schema.py declares every option once: the command line, the API's keywords, the
Olive pass (tests/test_olive.py) and docs/USAGE.md's table are made from it and cannot drift."""
from __future__ import annotations

import re

import pytest

import onnxsnp
from onnxsnp import api
from conftest import ROOT
from onnxsnp.cli import _inspect_parser, _prune_parser
from onnxsnp.option_schema import BY_NAME, OPTIONS, Front, Group, names
from onnxsnp.options import make_options
from options_table import USAGE, with_table

MODEL = ROOT / "models" / "digits_vit.onnx"
# the command line's own flags: paths, reports, the fidelity gate, output, a sweep's budgets
CLI_ONLY = {"help", "version", "input", "output", "min_fidelity", "max_perplexity_ratio", "report", "html", "quiet",
            "verbose", "targets", "kind", "out"}


def arguments(parser) -> dict[str, list]:
    found: dict[str, list] = {}
    for action in parser._actions:
        found.setdefault(action.dest, []).append(action)
    return found


def test_the_usage_table_is_the_schemas():
    text = USAGE.read_text()
    assert with_table(text) == text, "docs/USAGE.md's options table is out of date: python tools/options_table.py"


@pytest.mark.parametrize("front, sweep", [(Front.CLI_PRUNE, False), (Front.CLI_SWEEP, True)])
def test_the_command_line_takes_the_schemas_options_with_its_defaults(front, sweep):
    parser = _prune_parser(sweep=sweep)
    found = arguments(parser)
    assert set(found) - CLI_ONLY == set(names(front))
    parsed = vars(parser.parse_args(["in.onnx"] + (["--targets", "0.5", "--out", "d"] if sweep else ["out.onnx"])))
    for name in names(front):
        spec = BY_NAME[name]
        assert parsed[name] == spec.plain_default, name
        flag = found[name][0]
        assert flag.option_strings == [spec.flag]
        assert tuple(flag.choices or ()) == spec.allowed, name
    make_options(**{name: parsed[name] for name in names(front, Group.PRUNE)})  # what it parses is valid


def test_the_defaults_are_valid_and_said_once():
    """make_options takes the schema's defaults as given; no help text spells a default of its own
    (the front ends add it), so none can disagree with the schema."""
    assert make_options() == make_options(**{spec.name: spec.default for spec in OPTIONS if spec.group is Group.PRUNE})
    for spec in OPTIONS:
        if spec.default is not None:
            assert "default" not in spec.help, spec.name
        if spec.requires:
            assert spec.requires in BY_NAME and BY_NAME[spec.requires].group is spec.group


def test_the_api_takes_exactly_the_schemas_names(tmp_path):
    prune_names = set(names(Front.API_PRUNE, Group.PRUNE))
    assert prune_names == set(names(Front.CLI_PRUNE, Group.PRUNE)) | {"batch_size", "rescale_qk", "progress",
                                                                        "measure_latency", "one_head_size"}
    for name in prune_names - {"ratio"}:  # each one accepted with its default
        api.options(**{name: BY_NAME[name].default})
    with pytest.raises(onnxsnp.SnpError, match=r"^unknown option image_sise; the options are ratio, .*image_size"):
        onnxsnp.prune(str(MODEL), image_sise="32")
    for name in ("ratio", "target_flops"):  # a sweep's budgets are its targets
        with pytest.raises(onnxsnp.SnpError, match=f"^sweep takes no option {name};"):
            onnxsnp.sweep(str(MODEL), [0.5], tmp_path / "out", **{name: 0.3})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("page", [USAGE, ROOT / "README.md"], ids=lambda p: p.name)
def test_every_flag_the_page_names_exists(page):
    flags = {s for parser in (_prune_parser(), _prune_parser(sweep=True), _inspect_parser())
             for action in parser._actions for s in action.option_strings}
    # a family such as --image-* is not a flag
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z](?![\w*-])", page.read_text()))
    assert named - flags == set()


# a valid value other than the default for every prune option of the command line
NON_DEFAULT = {"ratio": "0.3", "qk_ratio": "0.25", "v_ratio": "0.2", "ffn_ratio": "0.1", "heads": "0.25",
               "residual": "0.1", "residual_criterion": "activation", "blocks": "1", "target_flops": "0.6",
               "target_params": None, "target_speedup": None, "target_latency": None, "timed_step": "prefill", "align": "8",
               "compensate": "bias", "reconstruct": "off", "selection": "criterion", "reduction": "select",
               "criterion": "l2", "calib_samples": "16", "seed": "3", "workers": "2", "ray_address": "auto",
               "qk_norm_cut": "sliced"}


def test_every_option_given_on_the_command_line_reaches_the_prune():
    """cli._options passes on what was parsed (it once dropped the ratios a sweep does not take)."""
    from onnxsnp.cli import _options

    assert set(NON_DEFAULT) == set(names(Front.CLI_PRUNE, Group.PRUNE))
    given = {name: text for name, text in NON_DEFAULT.items() if text is not None}  # one target at a time
    argv = ["in.onnx", "out.onnx", "-q"] + [part for name, text in given.items() for part in (BY_NAME[name].flag, text)]
    values = {name: (BY_NAME[name].cli_type or str)(text) for name, text in given.items()}
    want = make_options(**values, progress=False, measure_latency=False)
    assert _options(_prune_parser().parse_args(argv)) == want
    assert want != make_options(progress=False, measure_latency=False)
