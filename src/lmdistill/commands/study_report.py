"""A study's report: `report.md` (a table readable without the code) and the plots `curves.png` and `gap.png`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmdistill.config import STUDY_ARMS  # noqa: E402

DEFAULT_CORPUS = (
    "the built-in offline corpus (Wikipedia sample, Shakespeare, King James Bible; held out: Wikipedia articles)"
)


def plus_minus(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std`` scaled and rounded; the mean alone when std is None, ``—`` when mean is None."""
    if mean is None:
        return "—"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def precision_text(env: dict[str, Any]) -> str:
    """The runs' precision and its reason as a phrase of the setup paragraph (``precision`` of the results'
    environment, from the runs' environment.json; see `lmdistill.provenance.recorded_precision`)."""
    precision = env.get("precision")
    if precision is None:
        return "precision not recorded"
    shown = "bf16 and fp32" if precision == "mixed" else precision
    return f"runs in {shown} ({env['precision_reason']})"


def undefined_gap_seeds(results: dict[str, Any]) -> list[int]:
    """The seeds whose `random` run is not worse than the teacher: there the gap closed is undefined (null)."""
    random = results["arms"].get("random")
    teacher_loss = results["teacher"]["val_loss"]
    return [r["seed"] for r in random["per_seed"] if r["val_loss"] <= teacher_loss] if random else []


def gap_warning(results: dict[str, Any]) -> str | None:
    """A warning line when the gap closed is undefined for some seed (see `undefined_gap_seeds`), else None."""
    seeds = undefined_gap_seeds(results)
    if not seeds:
        return None
    return (
        f"**Warning: gap closed undefined.** The teacher's held-out loss ({results['teacher']['val_loss']:.3f}) is "
        f"not below that of the `random` run of seed(s) {', '.join(map(str, seeds))}: there (L_random − L_arm) / "
        "(L_random − L_teacher) would turn an arm worse than `random` into a positive share, so the gap closed is "
        "left out (null in results.json) wherever its baseline is not worse than the teacher."
    )


def headline_table(results: dict[str, Any]) -> str:
    """The Markdown table of arms: held-out loss, perplexity and gap closed (mean ± standard deviation over seeds)."""
    rows = [
        "| arm | what it is | seeds | val loss (nats/token) | perplexity | gap closed, loss | gap closed, ppl "
        "| step-0 loss | tokens | time per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in results["arms"].items():
        rows.append(
            f"| `{name}` | {STUDY_ARMS[name].description} | {len(arm['seeds'])} "
            f"| {plus_minus(arm['val_loss'], arm['val_loss_std'])} "
            f"| {plus_minus(arm['val_ppl'], arm['val_ppl_std'], digits=1)} "
            f"| {plus_minus(arm['gap_closed_loss'], arm['gap_closed_loss_std'], 100, 1)}"
            f"{'' if arm['gap_closed_loss'] is None else ' %'} "
            f"| {plus_minus(arm['gap_closed_ppl'], arm['gap_closed_ppl_std'], 100, 1)}"
            f"{'' if arm['gap_closed_ppl'] is None else ' %'} "
            f"| {arm['step0_val_loss']:.2f} | {arm['tokens']:,} | {arm['seconds'] / 60:.1f} min |"
        )
    teacher = results["teacher"]
    teacher_share = "—" if undefined_gap_seeds(results) else "100 %"
    rows.append(
        f"| teacher | {teacher['name']}, {teacher['parameters'] / 1e6:.1f}M parameters | — | {teacher['val_loss']:.3f} "
        f"| {teacher['val_ppl']:.1f} | {teacher_share} | {teacher_share} | — | — | — |"
    )
    return "\n".join(rows)


def write_report(results: dict[str, Any], path: Path) -> None:
    """Write `report.md`: the setup in a paragraph, the table, how to read it, and the plots."""
    config, setup, student = results["config"], results["setup"], results["student"]
    shape = student["shape"]
    env = results["environment"]
    device = env["gpu"] or f"CPU ({env['cpu_threads']} threads)"
    kd_arms = [name for name, arm in results["arms"].items() if arm["loss"] != "ce"]
    kd_text = ""
    if kd_arms:
        mix = (
            "pure distillation"
            if config["kd_weight"] == 1
            else f"(1 − {config['kd_weight']})·CE + {config['kd_weight']}·KD"
        )
        kd_text = (
            f" Distillation arms ({', '.join(f'`{a}`' for a in kd_arms)}) train on {mix} with {config['kd_loss']} at "
            f"temperature {config['temperature']}, read from a cache of the teacher's top-{config['top_k']} "
            "next-token distributions (plus the remaining mass) over exactly the blocks the runs read."
        )
    corpus = ", ".join(config["data"]) if config["data"] else DEFAULT_CORPUS
    teacher = results["teacher"]
    commit = (env["git"]["commit"] or "unknown")[:10]
    setup_text = (
        f"**Setup.** Teacher: {teacher['name']}, {teacher['parameters'] / 1e6:.1f}M parameters. Student: the teacher's "
        f"architecture at hidden size {shape['hidden_size']}, {shape['num_layers']} blocks, {shape['num_heads']} "
        f"query heads ({shape['num_kv_heads']} key/value) of width {shape['head_dim']}, MLP "
        f"{shape['intermediate_size']}, vocabulary {shape['vocab_size']:,}: {student['parameters'] / 1e6:.1f}M "
        f"parameters. Every run trains on {setup['train_tokens_per_run']:,} tokens of {corpus} ({setup['max_steps']} "
        f"steps of {config['batch_size']} sequences × {config['seq_len']} tokens), in the same order for every run, "
        f"with AdamW (lr {config['lr']}, {config['warmup_steps']} warmup steps, cosine decay to "
        f"{config['min_lr_ratio']}× lr, weight decay {config['weight_decay']}, clipping at {config['grad_clip']})."
        f"{kd_text} Seeds change only the student's random initialization. All models, the teacher included, are "
        f"evaluated on the same {setup['eval_tokens']:,} held-out tokens; the gap closed is (L_random − L_arm) / "
        "(L_random − L_teacher), paired with the `random` run of the same seed, in the loss form and in the "
        "perplexity form. Spreads are standard deviations over seeds (none with one seed). Ran on "
        f"{device}, {precision_text(env)}, torch {env['torch']}, lmdistill {env['lmdistill']} (commit {commit})."
    )
    warning = gap_warning(results)
    if warning:
        setup_text += f"\n\n{warning}"
    if results["runs_finished"] < results["runs_planned"]:
        setup_text += (
            f"\n\n**Partial results:** {results['runs_finished']} of the {results['runs_planned']} planned runs have "
            "finished; each arm shows the seeds finished so far."
        )
    title = f"{teacher['name']} → {student['parameters'] / 1e6:.1f}M student"
    text = "\n\n".join(
        [
            f"# Study: GUIDE initialization and distillation, {title}",
            setup_text,
            headline_table(results),
            "Step-0 loss is the held-out loss of the initialized student before training: GUIDE's assembled block "
            "and tied PCA head start over-confident, so judge initializations after training, not at step 0.",
            "![held-out perplexity against tokens seen](curves.png)",
            "![share of the teacher–student gap closed](gap.png)",
        ]
    )
    path.write_text(text + "\n")


def write_plots(results: dict[str, Any], out: Path) -> None:
    """Write `curves.png` (held-out perplexity against tokens seen) and `gap.png` (gap closed per arm)."""
    arms, teacher = results["arms"], results["teacher"]
    colors = plt.get_cmap("tab10")

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for i, (name, arm) in enumerate(arms.items()):
        curves = [run["curve"] for run in arm["per_seed"]]
        tokens = [point["tokens"] for point in curves[0]]
        ppl = [[point["val_ppl"] for point in curve] for curve in curves]
        mean = [sum(values) / len(values) for values in zip(*ppl)]
        ax.plot(tokens, mean, marker="o", markersize=3, color=colors(i), label=name)
        if len(curves) > 1:
            ax.fill_between(
                tokens, [min(v) for v in zip(*ppl)], [max(v) for v in zip(*ppl)], color=colors(i), alpha=0.15
            )
    ax.axhline(
        teacher["val_ppl"], color="black", linestyle="--", linewidth=1, label=f"teacher ({teacher['val_ppl']:.1f})"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Held-out perplexity during training (mean over seeds; band: min–max)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    plt.close(fig)

    names = [name for name, arm in arms.items() if name != "random" and arm["gap_closed_loss"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    if names:
        values = [100 * arms[n]["gap_closed_loss"] for n in names]
        stds = [arms[n]["gap_closed_loss_std"] for n in names]
        errors = [100 * std if std is not None else float("nan") for std in stds]  # NaN: no bar for one seed
        bars = ax.bar(names, values, yerr=errors, capsize=4, color=[colors(list(arms).index(n)) for n in names])
        ax.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=3, fontsize=8)
    else:
        if undefined_gap_seeds(results):
            text = "the teacher is not better than `random`: the gap closed is undefined"
        else:
            text = "no `random` arm: the gap closed is undefined" if "random" not in arms else "no arm but `random`"
        ax.text(0.5, 0.5, text, ha="center", transform=ax.transAxes)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("gap closed vs random init (%, loss form)")
    ax.set_title("Teacher–student gap closed (error bars: std over seeds, where several)", fontsize=10)
    ax.margins(y=0.12)
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "gap.png")
    plt.close(fig)
