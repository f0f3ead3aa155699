"""A rationale study's report: `report.md` (per task a table of arms, the teacher and the shares of rationale words
found in the gold answer, and in the answer or a choice) and `accuracy_vs_k.png` (saliency accuracy against k beside
the other arms and the teacher)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmdistill.commands.study_report import device_text, machines_text, plus_minus, precision_text  # noqa: E402
from lmdistill.config import RATIONALE_STUDY_ARMS, RationaleStudyConfig  # noqa: E402

TASK_NAMES = {"svamp": "SVAMP", "cqa": "CommonsenseQA (CQA)", "gsm-symbolic": "gsm-symbolic", "esnli": "e-SNLI"}
# the report's paired comparisons: results key, baseline in the table header, sentence before the table
COMPARISONS = (
    ("vs_finetune", "finetune", "Against `finetune`"),
    (
        "vs_random",
        "random-k",
        "Each `saliency-k` arm against `random-k` of the same k (the teacher's ranking against chance)",
    ),
)


def _describe(name: str, arm: dict[str, Any]) -> str:
    return RATIONALE_STUDY_ARMS[RationaleStudyConfig.arm_kind(name)].description.format(k=arm["k"])


def _percent(value: float | None) -> str:
    return plus_minus(value, None, 100, 1)


def task_table(task: dict[str, Any]) -> str:
    """The Markdown table of one task: per arm its rationale targets, k, accuracy (%, mean ± sample std over seeds),
    the accuracy of each seed and the seeds; the teacher last."""
    rows = [
        "| arm | rationale targets | k | accuracy (%) | per seed | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in task["arms"].items():
        per_seed = ", ".join(_percent(r["accuracy"]) for r in arm["per_seed"])
        rows.append(
            f"| `{name}` | {_describe(name, arm)} | {arm['k'] if arm['k'] is not None else '—'} "
            f"| {plus_minus(arm['accuracy_mean'], arm['accuracy_std'], 100, 1)} | {per_seed} | {len(arm['seeds'])} |"
        )
    teacher = task["teacher"]
    if teacher is not None:
        rows.append(
            f"| teacher | {teacher['model_name']} | — | {_percent(task['teacher_accuracy'])} "
            f"({teacher['correct']} of {teacher['total']}) | — | — |"
        )
    return "\n".join(rows)


def comparison_table(task: dict[str, Any], key: str, baseline: str) -> str | None:
    """Every arm holding the paired comparison ``key`` (``vs_finetune``, ``vs_random``) against its baseline, named
    ``baseline`` in the header: the accuracy difference (points; mean over the shared seeds) with its 95 %
    paired-bootstrap interval over test examples, each seed's difference and McNemar p; None without comparisons."""
    rows = []
    for name, arm in task["arms"].items():
        c = arm.get(key)
        if not c:
            continue
        seeds = ", ".join(f"{100 * r['difference']:+.1f} (p = {r['mcnemar_p']:.2g})" for r in c["per_seed"])
        verdict = "effect" if c["effect"] else "within the noise"
        rows.append(
            f"| `{name}` | {100 * c['difference']:+.1f} | [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] | {seeds} "
            f"| {verdict} |"
        )
    if not rows:
        return None
    head = f"| arm | vs {baseline} (points) | 95 % interval | per seed (McNemar p) | reading |"
    return "\n".join([head, "|---|---|---|---|---|", *rows])


def word_share_line(task: dict[str, Any]) -> str | None:
    """One sentence: per k the share of rationale words that occur in the gold answer (the paper's measure), and in
    the gold answer or one of the choices."""
    shares = task["rationale_word_share"]
    if not shares:
        return None

    def values(measure: dict[str, float | None]) -> str:
        return ", ".join(f"k = {k}: {_percent(v)}%" for k, v in measure.items())

    return (
        f"Saliency rationale words that occur in the gold answer (the paper's measure; whole words, any case; "
        f"{task['rationale_records']} training examples): {values(shares)}; in the gold answer or one of the choices: "
        f"{values(task['rationale_word_share_any_choice'])}. The teacher's answers were right on "
        f"{_percent(task['train_teacher_accuracy'])}% of these examples (the rationales explain its own answer)."
    )


def accuracy_tables(results: dict[str, Any]) -> str:
    """Every task's table under a heading (what the command prints)."""
    return "\n\n".join(
        f"{TASK_NAMES.get(name, name)}:\n\n{task_table(task)}" for name, task in results["tasks"].items()
    )


def write_report(results: dict[str, Any], path: Path) -> None:
    """Write `report.md`: the setup in a paragraph, per task the table and the rationale-word share, the plot."""
    config, env = results["config"], results["environment"]
    device = device_text(env)
    commit = (env["git"]["commit"] or "unknown")[:10]
    seeds = config["seeds"]
    train = "every training example" if config["train_limit"] is None else f"the first {config['train_limit']}"
    test = "every example" if config["test_limit"] is None else f"the first {config['test_limit']} examples"
    stop = "stop words left out" if config["stop_words"] else "stop words kept"
    teacher = config["teacher"]
    if config["task_teachers"]:
        teacher = f"{', '.join(config['task_teachers'])} (other tasks: {teacher})"
    random = ""
    if "random" in config["arms"]:
        random = f"; `random-k` arms: k of the same candidate words drawn at random (seed {config['random_seed']} and "
        random += "the example's id)"
    setup = (
        f"**Setup.** Teacher: {teacher}. Student: `{config['student']}`; every run starts from it and "
        f"trains for {config['max_steps']} steps of {config['batch_size']} examples × {config['grad_accum']} "
        f"micro-batch(es) on {train} of the task's training split (a share of {config['val_fraction']} held out for "
        f"the label loss), with AdamW (lr {config['lr']}, {config['warmup_steps']} warmup steps, cosine decay to "
        f"{config['min_lr_ratio']}× lr, weight decay {config['weight_decay']}, clipping at {config['grad_clip']}) on "
        f"L_label + λ · L_rationale with λ = {config['lambda_rationale']} (`finetune`: λ = 0), sequences of at most "
        f"{config['max_len']} tokens. Arms differ only in the rationale targets. Saliency rationales: the teacher's "
        f"answer attributed to its input with {config['method']} ({config['reduction']} norm over the embedding), "
        f"the top-k words ({stop}), extracted once at the largest k in score order, the smaller k being each "
        f"record's first k words{random}. Seeds ({', '.join(map(str, seeds))}) change the order of the examples. "
        f"Accuracy on {test} of the {config['eval_split']} split from the `predict:` prompt alone (choice scoring "
        f"with multiple choice, greedy answers of at most {config['max_new_tokens']} tokens otherwise, SVAMP "
        "equations evaluated), the teacher's with the same prompts and code, in fp32; ± is the sample standard "
        "deviation over seeds (none with one seed). "
        f"Ran on {device} [{machines_text(results['machines'])}], "
        f"training {precision_text(env)}, torch {env['torch']}, lmdistill {env['lmdistill']} "
        f"(commit {commit})."
    )
    if results["runs_finished"] < results["runs_planned"]:
        setup += (
            f"\n\n**Partial results:** {results['runs_finished']} of the {results['runs_planned']} planned runs have "
            "finished; each arm shows the seeds finished so far."
        )
    sections = [f"# Rationale study of `{config['student']}`", setup]
    for name, task in results["tasks"].items():
        sections.append(f"## {TASK_NAMES.get(name, name)}")
        sections.append(task_table(task))
        for key, baseline, against in COMPARISONS:
            comparison = comparison_table(task, key, baseline)
            if comparison:
                sections += [
                    f"{against}, paired by seed and test example (an effect only where the interval excludes 0):",
                    comparison,
                ]
        line = word_share_line(task)
        if line:
            sections.append(line)
    sections.append("![accuracy against the number k of rationale words](accuracy_vs_k.png)")
    path.write_text("\n\n".join(sections) + "\n")


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Write `accuracy_vs_k.png`: per task, the saliency and random arms' accuracy against k (error bars: std over
    seeds, where several), the other arms (bands: their std) and the teacher as horizontal lines."""
    tasks, split = results["tasks"], results.get("config", {}).get("eval_split", "test")
    # at least 8 inches wide, so that one task's figure holds the title
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(8.0, 5.2 * len(tasks)), 4.2), dpi=120, squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (name, task) in zip(axes[0], tasks.items()):
        highest = [100 * (a["accuracy_mean"] + (a["accuracy_std"] or 0)) for a in task["arms"].values()]
        highest.append(100 * (task["teacher_accuracy"] or 0))
        ax.set_ylim(0, min(105, 1.2 * max(highest) + 2))  # from 0: differences at their true scale
        curves = [kind for kind, arm_kind in RATIONALE_STUDY_ARMS.items() if arm_kind.style is None]
        ks: set[int] = set()
        for i, kind in enumerate(curves):
            points = sorted(
                (arm["k"], arm)
                for arm_name, arm in task["arms"].items()
                if RationaleStudyConfig.arm_kind(arm_name) == kind
            )
            if points:
                means = [100 * arm["accuracy_mean"] for _, arm in points]
                errors = [math.nan if arm["accuracy_std"] is None else 100 * arm["accuracy_std"] for _, arm in points]
                ax.errorbar(
                    [k for k, _ in points], means, yerr=errors, marker="os"[i % 2], capsize=4, color=colors(i),
                    label=f"{kind} rationales",
                )  # fmt: skip
                ks.update(k for k, _ in points)
        if ks:
            ax.set_xticks(sorted(ks))
        lines = [(name, kind.style) for name, kind in RATIONALE_STUDY_ARMS.items() if kind.style is not None]
        for i, (arm_name, style) in enumerate(lines, start=len(curves)):
            if arm_name in task["arms"]:
                arm = task["arms"][arm_name]
                value = 100 * arm["accuracy_mean"]
                ax.axhline(value, color=colors(i), linestyle=style, label=f"{arm_name} ({value:.1f})")
                if arm["accuracy_std"]:  # the spread over seeds as a band
                    std = 100 * arm["accuracy_std"]
                    ax.axhspan(value - std, value + std, color=colors(i), alpha=0.08)
        if task["teacher_accuracy"] is not None:
            value = 100 * task["teacher_accuracy"]
            ax.axhline(value, color="black", linestyle="--", linewidth=1, label=f"teacher ({value:.1f})")
        ax.set_title(TASK_NAMES.get(name, name))
        ax.set_xlabel("k (rationale words per example)")
        ax.set_ylabel(f"{split} accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Student accuracy against k (mean over seeds; error bars and bands: std, where several)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
