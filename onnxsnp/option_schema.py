"""Every option a user can set, declared once: its name, default, type, choices and help.

The front ends are built from this table, so that they cannot disagree: the command line's
arguments (cli.py), the keywords `onnxsnp.prune` / `sweep` accept (api.py), the Olive pass's
config (olive.py), the defaults `options.make_options` fills in (it stays the one place that
checks the values) and the options table of docs/USAGE.md (`python tools/options_table.py`
rewrites it; tests/test_option_schema.py checks it is current).

Options that only steer one front end (the CLI's output paths, --report, --html, the fidelity
gate, -q/-v; the sweep's budgets) stay with that front end."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, Flag, auto
from typing import Optional, Union

from .data.calib_images import RESAMPLING
from .score.criteria import CRITERIA
from .match.blocks import QkNormCut
from .plan import Propagation, Reduction, Selection, TimedStep


class Compensation(Enum):
    LSTSQ = "lstsq"  # block-by-block reconstruction (or, where the model cannot be cut into blocks, one-pass refits)
    BIAS = "bias"  # the removed neurons' mean contribution folded into the next bias (one pass)
    NONE = "none"


class ResidualCriterion(Enum):
    WEIGHTS = "weights"
    ACTIVATION = "activation"


class Front(Flag):
    """Where an option can be given."""
    CLI_PRUNE = auto()  # onnxsnp IN OUT
    CLI_SWEEP = auto()  # onnxsnp sweep IN --targets …
    API_PRUNE = auto()  # onnxsnp.prune(…) and onnxsnp.api.options(…)
    API_SWEEP = auto()  # onnxsnp.sweep(…)
    OLIVE = auto()  # the SnpPruning pass


# a sweep's budgets are its targets, so neither its CLI nor its API takes ratios or a target
_ONE_PRUNE = Front.CLI_PRUNE | Front.API_PRUNE | Front.OLIVE
_EVERYWHERE = _ONE_PRUNE | Front.CLI_SWEEP | Front.API_SWEEP
_API_ONLY = Front.API_PRUNE | Front.API_SWEEP  # what the command line decides from other flags, or never changes


class Group(Enum):
    """Who reads an option."""
    PRUNE = "prune"  # options.make_options → PruneOptions
    CALIB = "calibration"  # the calibration arrays' .npz path (the API also takes the arrays)
    RAW = "calibration from raw data"  # calib_data.raw_request


@dataclass(frozen=True)
class OptionSpec:
    name: str  # the API keyword and Olive config key; the CLI flag is --name with - for _
    default: object  # None: unset (the help says what that means)
    help: str  # no default in it: the front ends add the default from `default`
    value: object = float  # the type a value has (an Enum: one of its members, given by value)
    fronts: Front = _EVERYWHERE
    group: Group = Group.PRUNE
    parse: bool = True  # False: the CLI keeps the text (parsed later, e.g. absolute counts like 1.2e9)
    choices: tuple[str, ...] = ()  # for a str value; an Enum's come from its members
    metavar: str | None = None
    requires: str | None = None  # the option this one applies only with
    off: tuple[str, str] | None = None  # (value, help) of a --no-NAME flag on the CLI

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def allowed(self) -> tuple[str, ...]:
        if isinstance(self.value, type) and issubclass(self.value, Enum):
            return tuple(member.value for member in self.value)
        return self.choices

    @property
    def plain_default(self):
        """The default as a command line or a JSON config spells it (an Enum member's value)."""
        return self.default.value if isinstance(self.default, Enum) else self.default

    @property
    def cli_type(self):
        """argparse's `type`: None keeps the text."""
        return self.value if self.parse and self.value in (int, float) else None

    @property
    def config_type(self):
        """The type of the Olive pass's config field (JSON values: an Enum's are strings)."""
        kind = str if isinstance(self.value, type) and issubclass(self.value, Enum) else self.value
        return Optional[kind] if self.default is None else kind


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("ratio", 0.5, "fraction of neurons removed from each group: Q/K pairs, V, FFN (0 <= R < 1)",
               fronts=_ONE_PRUNE),
    OptionSpec("qk_ratio", None, "override --ratio for query/key pairs", fronts=_ONE_PRUNE),
    OptionSpec("v_ratio", None, "override --ratio for value neurons", fronts=_ONE_PRUNE),
    OptionSpec("ffn_ratio", None, "override --ratio for FFN hidden neurons", fronts=_ONE_PRUNE),
    OptionSpec("heads", 0.0, "fraction of whole heads removed in every attention block, by their output on "
                             "calibration data (0 <= R < 1); combines with the neuron ratios"),
    OptionSpec("residual", 0.0, "fraction of residual-stream channels removed everywhere in the stream (patch/cls/"
                                "position embeddings, LayerNorms, every projection reading or writing it); 0 <= R < 1; "
                                "encoders only (a decoder is refused)"),
    OptionSpec("residual_criterion", ResidualCriterion.WEIGHTS,
               "how residual channels are scored: weights, the norms of the weights reading/writing them (measured "
               "better), or activation, their RMS on calibration data", value=ResidualCriterion),
    OptionSpec("blocks", 0, "remove N whole transformer blocks, those that change the residual stream least on "
                            "calibration data; or the blocks with indices I,J (0-based; '5,' for one)",
               value=Union[int, str], parse=False, metavar="N|I,J"),
    OptionSpec("target_flops", None, "instead of ratios: reach F FLOPs (a fraction of the original like 0.5, or an "
                                     "absolute count), choosing how the cut is shared between Q/K, V and FFN by "
                                     "measured fidelity", fronts=_ONE_PRUNE, parse=False, metavar="F"),
    OptionSpec("target_params", None, "like --target-flops, for the parameter count", fronts=_ONE_PRUNE,
               parse=False, metavar="P"),
    OptionSpec("target_speedup", None, "instead of ratios: run S times faster (S > 1) than the original, as "
                                       "predicted from each node's time measured with onnxruntime on this machine "
                                       "(one thread)", fronts=_ONE_PRUNE, parse=False, metavar="S"),
    OptionSpec("target_latency", None, "like --target-speedup, for MS milliseconds per run of one sample (MS > 0)",
               fronts=_ONE_PRUNE, parse=False, metavar="MS"),
    OptionSpec("timed_step", TimedStep.DECODE,
               "what --target-speedup / --target-latency time on a language model with a KV cache: decode (one "
               "new token after a prompt, what generation repeats per token) or prefill (the prompt itself); other "
               "models run one sample", value=TimedStep),
    OptionSpec("align", 1, "round kept widths up to a multiple of this (e.g. 8 for fast kernels)", value=int),
    OptionSpec("compensate", Compensation.LSTSQ,
               "restore what pruning changes from calibration data: lstsq (block by block, the output projection "
               "and fc2 refitted so that the residual stream follows the original's), bias (the removed neurons' "
               "mean contribution folded into the bias) or none", value=Compensation,
               off=("none", "same as --compensate none (also skips the LayerNorm correction)")),
    OptionSpec("reconstruct", Propagation.SEQUENTIAL,
               "sequential: each block is refitted on the pruned model's own activations; one-shot: on the original "
               "model's; off: no block-by-block reconstruction, the faster one-pass refit of earlier versions",
               value=Propagation),
    OptionSpec("selection", Selection.OBS, "how V neurons, heads and FFN neurons are chosen with --compensate lstsq: "
                                           "obs (by the error the refit is left with) or criterion (by --criterion's "
                                           "scores)", value=Selection),
    OptionSpec("reduction", Reduction.PROJECT,
               "project: a head's kept Q/K pairs and V neurons become its best directions for the attention scores "
               "and the value path; select: a choice of its neurons (the paper's SNP; Q/K pairs rescaled)",
               value=Reduction),
    OptionSpec("qk_norm_cut", QkNormCut.OFF,
               "Q/K dims within the heads of a per-head QK-norm (Qwen3, Gemma 3): off keeps each head's Q/K whole "
               "(whole key/value groups may still go); sliced cuts them, the norm's mean square then taken over the "
               "kept dims; calibrated also rescales each head's norm weight by the calibration's mean ratio of the "
               "kept dims' mean square to the full one (needs --compensate lstsq with the block-by-block "
               "reconstruction); measured in docs/DECODER_FAMILIES.md", value=QkNormCut),
    OptionSpec("criterion", "snp", "neuron scoring: snp, snp-paper, l2 or random", value=str, choices=CRITERIA),
    OptionSpec("calib", None, "calibration arrays keyed by model input name, first axis = samples (default: "
                              "synthetic inputs, with a warning)", value=str, group=Group.CALIB, metavar="FILE.npz"),
    OptionSpec("calib_samples", None, "calibration samples to use (default: all given; 64 synthetic ones without "
                                      "data); with --calib-text on a language model, windows of its token stream",
               value=int),
    OptionSpec("calib_text", None, "one text per line, or JSONL records (.jsonl, or lines that are JSON objects)",
               value=str, group=Group.RAW, metavar="FILE"),
    OptionSpec("text_field", "text", "the JSONL field holding the text", value=str, group=Group.RAW,
               metavar="NAME", requires="calib_text"),
    OptionSpec("tokenizer", None, "a tokenizers tokenizer.json or its folder (default: tokenizer.json beside IN)",
               value=str, group=Group.RAW, metavar="PATH", requires="calib_text"),
    OptionSpec("max_length", 128, "truncate texts to this many tokens where the model's sequence length is dynamic "
                                  "(padding goes to the longest text kept; a language model's windows are this "
                                  "long); a static length is always used",
               value=int, group=Group.RAW, metavar="N", requires="calib_text"),
    OptionSpec("calib_images", None, "a folder of JPEG/PNG images (sub-folders too), preprocessed as "
                                     "preprocessor_config.json beside IN says, or as the --image-* options say",
               value=str, group=Group.RAW, metavar="DIR"),
    OptionSpec("image_size", None, "resize: N = shortest edge to N keeping the aspect, HxW = exactly (default: the "
                                   "config's, else the model's input size)",
               value=str, group=Group.RAW, metavar="N|HxW", requires="calib_images"),
    OptionSpec("image_crop", None, "center crop after resizing (default: the config's, else none)",
               value=str, group=Group.RAW, metavar="N|HxW", requires="calib_images"),
    OptionSpec("image_scale", None, "multiply pixel values 0..255 by F (default: the config's rescale_factor, "
                                    "else 1/255)", group=Group.RAW, metavar="F", requires="calib_images"),
    OptionSpec("image_mean", None, "subtract per channel (default: the config's, else ImageNet's)",
               value=str, group=Group.RAW, metavar="M[,M,M]", requires="calib_images"),
    OptionSpec("image_std", None, "then divide per channel (default: the config's, else ImageNet's)",
               value=str, group=Group.RAW, metavar="S[,S,S]", requires="calib_images"),
    OptionSpec("image_resample", None, "resize filter (default: the config's, else bilinear)",
               value=str, group=Group.RAW, choices=tuple(RESAMPLING), requires="calib_images"),
    OptionSpec("seed", 0, "seed for synthetic data, the choice of samples and --criterion random", value=int),
    OptionSpec("workers", 1, "hold the calibration batches of the block-by-block reconstruction on N Ray worker "
                             "processes (at most one per calibration batch; needs pip install 'onnxsnp[ray]'); the "
                             "result is the same as with one process. 1: this process, no Ray", value=int, metavar="N"),
    OptionSpec("ray_address", None, "run the --workers on this existing Ray cluster (e.g. auto, or ray://head:10001) "
                                    "instead of a Ray instance started for the run", value=str, metavar="ADDR"),
    OptionSpec("batch_size", None, "samples per onnxruntime run over the calibration data (default: "
                                   "calibration.DEFAULT_BATCH; a fixed-batch model's own batch)",
               value=int, fronts=_API_ONLY),
    OptionSpec("rescale_qk", True, "rescale the kept Q/K pairs by least squares where they are a choice of neurons "
                                   "(with --compensate lstsq)", value=bool, fronts=_API_ONLY),
    OptionSpec("progress", False, "say on stderr how long each stage takes (the CLI: unless -q)", value=bool,
               fronts=_API_ONLY),
    OptionSpec("measure_latency", True, "time the original and the pruned model for the report (the CLI: unless "
                                        "-q without --report/--html)", value=bool, fronts=_API_ONLY),
    OptionSpec("one_head_size", False, "every attention keeps the same heads and per-head width, Q/K = V (the CLI: "
                                       "for an onnxruntime-genai folder)", value=bool, fronts=_API_ONLY),
)

BY_NAME = {spec.name: spec for spec in OPTIONS}


def names(front: Front, group: Group | None = None) -> tuple[str, ...]:
    """The options `front` takes (of `group`), in the table's order; for several fronts OR-ed
    together, those every one of them takes."""
    return tuple(spec.name for spec in OPTIONS if front in spec.fronts and group in (None, spec.group))


def defaults(group: Group) -> dict[str, object]:
    return {spec.name: spec.default for spec in OPTIONS if spec.group is group}


def markdown_table() -> str:
    """docs/USAGE.md's options table."""
    where = ((Front.CLI_PRUNE, "CLI"), (Front.CLI_SWEEP, "sweep"), (Front.API_PRUNE, "API"), (Front.OLIVE, "Olive"))
    rows = ["| option | keyword | default | where | meaning |", "|---|---|---|---|---|"]
    for spec in OPTIONS:
        flag = f"`{spec.flag}`" if spec.fronts & (Front.CLI_PRUNE | Front.CLI_SWEEP) else ""
        if spec.off:
            flag += f", `--no-{spec.flag[2:]}`"
        default = "" if spec.default is None else f"`{spec.plain_default}`"
        meaning = spec.help + (f"; one of {', '.join(spec.allowed)}" if spec.allowed and
                               not all(choice in spec.help for choice in spec.allowed) else "")
        cells = (flag, f"`{spec.name}`", default, ", ".join(label for front, label in where if front in spec.fronts),
                 meaning)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
