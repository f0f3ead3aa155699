"""The `lmdistill` command line: one explicit table of commands, each a config dataclass and a run function.

A command name is one word (`init`) or two (`rationales extract`); the first word of a two-word name is a group
(`lmdistill rationales --help` lists its commands). Every command accepts `--config FILE.yaml` (a serialized
config); flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from transformers import HfArgumentParser

from lmdistill import __version__
from lmdistill.config import (
    CacheTeacherConfig,
    DemoConfig,
    EvalConfig,
    InitConfig,
    RationaleEvalConfig,
    RationaleExtractConfig,
    RationaleStudyConfig,
    RationaleTrainConfig,
    StudyConfig,
    TrainConfig,
    load_yaml,
)
from lmdistill.errors import LmdistillError


def _init(config: InitConfig) -> None:
    from lmdistill.commands.init import format_report, run_init

    print(format_report(run_init(config), config.out))


def _train(config: TrainConfig) -> None:
    from lmdistill.commands.estimate import estimate_train, warn_if_too_big
    from lmdistill.train.loop import run_train  # imported first: the estimate's baseline is the running process

    estimate = estimate_train(config)
    if config.dry_run:
        print(estimate.table())
        return
    warn_if_too_big(estimate)
    summary = run_train(config)
    if "final" in summary:
        print(json.dumps(summary, indent=2))


def _cache_teacher(config: CacheTeacherConfig) -> None:
    from lmdistill.commands.cache_teacher import run_cache_teacher

    manifest = run_cache_teacher(config)
    print(
        f"teacher cache of {manifest['num_blocks']} blocks x {manifest['seq_len']} tokens, top-{manifest['top_k']}, "
        f"teacher in {manifest['teacher_dtype']} ({manifest['teacher_dtype_reason']}), written to {config.out}"
    )


def _eval(config: EvalConfig) -> None:
    from lmdistill.commands.eval import run_eval
    from lmdistill.evaluation import GAP_UNDEFINED

    results = run_eval(config)
    for name in ("model", "baseline", "teacher"):
        if name in results:
            r = results[name]
            dtype = f" (in {r['dtype']})" if "dtype" in r else ""
            print(f"{name:9s} val loss {r['val_loss']:.4f} nats/token, perplexity {r['val_ppl']:.2f}{dtype}")
    if "gap_closed_loss" in results and results["gap_closed_loss"] is None:
        print(f"gap closed: {GAP_UNDEFINED}")
    elif "gap_closed_loss" in results:
        print(
            f"gap closed: {100 * results['gap_closed_loss']:.1f}% (loss), {100 * results['gap_closed_ppl']:.1f}% "
            "(perplexity)"
        )
    print(f"results written to {results['written_to']}")


def _study(config: StudyConfig) -> None:
    from lmdistill.commands.estimate import estimate_study, warn_if_too_big
    from lmdistill.commands.study import run_study
    from lmdistill.commands.study_report import headline_table

    estimate = estimate_study(config)
    if config.dry_run:
        print(estimate.table())
        return
    warn_if_too_big(estimate)
    results = run_study(config)
    out = results["written_to"]
    if config.only:
        for name, summary in results["runs"].items():
            print(f"{name}: trained student in {summary['final']}")
        return
    plots = ", ".join(f"{out}/{name}" for name in ("curves.png", "gap.png", "budgets.png"))
    print(f"\n{headline_table(results)}\n\nreport: {out}/report.md (plots: {plots})")


def _demo(config: DemoConfig) -> None:
    _study(config.study_config())


def _rationales_extract(config: RationaleExtractConfig) -> None:
    from lmdistill.commands.rationales_extract import run_extract

    summary = run_extract(config)
    speed = f", {summary['examples_per_s']:.2f} examples/s" if summary["examples_per_s"] else ""
    print(
        f"{summary['new']} new rationales{speed}; {summary['total']} in {summary['out']}, teacher accuracy "
        f"{100 * summary['accuracy']:.1f}% on them; teacher in {summary['teacher_dtype']} "
        f"({summary['teacher_dtype_reason']})"
    )


def _rationales_train(config: RationaleTrainConfig) -> None:
    from lmdistill.commands.rationales_train import run_rationale_train

    summary = run_rationale_train(config)
    if "final" in summary:
        data = summary["data"]
        print(
            f"trained on {data['train_examples']} examples ({data['train_with_rationale']} with a rationale, "
            f"lambda {data['lambda_rationale']}); held-out label loss {summary['val_loss']:.4f} on "
            f"{data['heldout_examples']} examples; student in {summary['final']}"
        )


def _rationales_eval(config: RationaleEvalConfig) -> None:
    from lmdistill.commands.rationales_eval import run_rationale_eval

    results = run_rationale_eval(config)
    print(
        f"accuracy {100 * results['accuracy']:.1f}% ({results['correct']} of {results['total']}) on {results['task']} "
        f"{results['split']}; results written to {results['written_to']}"
    )


def _rationales_study(config: RationaleStudyConfig) -> None:
    from lmdistill.commands.rationales_report import accuracy_tables
    from lmdistill.commands.rationales_study import run_rationale_study

    results = run_rationale_study(config)
    out = results["written_to"]
    print(f"\n{accuracy_tables(results)}\n\nreport: {out}/report.md (plot: {out}/accuracy_vs_k.png)")


# name -> (config dataclass, run function, one-line description)
COMMANDS: dict[str, tuple[type, Callable[[Any], None], str]] = {
    "init": (InitConfig, _init, "initialize a student from a teacher (random, weight-selection, guide, guide-all)"),
    "train": (TrainConfig, _train, "train a student with cross-entropy and/or distillation (online or cached teacher)"),
    "cache-teacher": (CacheTeacherConfig, _cache_teacher, "store the teacher's top-k distributions for cached KD"),
    "eval": (EvalConfig, _eval, "held-out loss and perplexity; with --teacher and --baseline, the gap closed"),
    "study": (StudyConfig, _study, "compare initializations and losses on one student shape: results, report, plots"),
    "demo": (DemoConfig, _demo, "the study on built-in defaults, small enough for a 2-core CPU in 15 minutes"),
    "rationales extract": (
        RationaleExtractConfig,
        _rationales_extract,
        "teacher answers + gradient attributions -> top-k rationale words per example (JSON lines, resumable)",
    ),
    "rationales train": (
        RationaleTrainConfig,
        _rationales_train,
        "multitask training: predict: prompt -> label, explain: prompt -> rationale; loss = label + lambda * rationale",
    ),
    "rationales eval": (
        RationaleEvalConfig,
        _rationales_eval,
        "accuracy from the predict: prompt alone (choice scoring or greedy answers; SVAMP equations evaluated)",
    ),
    "rationales study": (
        RationaleStudyConfig,
        _rationales_study,
        "fine-tuning vs saliency rationales (each k) vs step-by-step vs gold, with seeds: results, report, plot",
    ),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it (`(default: the teacher's)` beats `None`)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """argparse's message for arguments no option takes, with the closest option to each mistyped flag."""
    names = [flag[2:] for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    guesses = []
    for arg in extra:
        if arg.startswith("--"):  # compared without the dashes, which every flag shares
            guesses += [f"--{name}" for name in difflib.get_close_matches(arg[2:].split("=", 1)[0], names, n=1)]
    hint = f"; did you mean {', '.join(guesses)}?" if guesses else ""
    return f"unrecognized arguments: {' '.join(extra)}{hint}"


def parse_config(config_class: type, args: list[str], prog: str) -> Any:
    """Build `config_class` from a YAML file given by `--config` (optional) and command-line flags.

    Args:
        config_class: the command's config dataclass.
        args: the command's arguments.
        prog: program name for usage messages.

    Returns:
        The validated config instance.

    Raises:
        SystemExit: (argparse, status 2) an unknown or mistyped flag or an invalid value; (status 0) after --help.
    """
    parser = HfArgumentParser(config_class, prog=prog, description=config_class.__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--config", help="YAML file setting any of these options; command-line flags override it")
    known, extra = parser.parse_known_args(args)
    if extra:
        parser.error(_unrecognized(parser, extra))
    if known.config:
        parser.set_defaults(**load_yaml(known.config, config_class))
    config, _extra = parser.parse_args_into_dataclasses(args)
    return config


GROUPS = {name.split()[0] for name in COMMANDS if " " in name}  # first words of two-word commands


def _usage(group: str | None = None) -> str:
    """The command list: every command, or (`group`) the commands of one group."""
    names = [name for name in COMMANDS if group is None or name.startswith(f"{group} ")]
    width = max(map(len, names))
    rows = "\n".join(f"  {name:{width}s}  {COMMANDS[name][2]}" for name in names)
    prog = "lmdistill" if group is None else f"lmdistill {group}"
    return f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for its options)\n\ncommands:\n{rows}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmdistill` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"lmdistill {__version__}")
        return 0
    group = argv[0] if argv[0] in GROUPS else None
    if group and len(argv) == 1:
        print(f"lmdistill {group}: a command is needed\n\n{_usage(group)}", file=sys.stderr)
        return 2
    if group and argv[1] in ("-h", "--help"):
        print(_usage(group))
        return 0
    words = 2 if group else 1
    name = " ".join(argv[:words])
    if name not in COMMANDS:
        print(f"lmdistill: unknown command '{name}'\n\n{_usage(group)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    config_class, run, _ = COMMANDS[name]
    try:
        run(parse_config(config_class, argv[words:], prog=f"lmdistill {name}"))
    except LmdistillError as exc:
        print(f"lmdistill {name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
