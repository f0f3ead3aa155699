"""A study's report: `report.md` (a table readable without the code) and the plots `curves.png` and `gap.png`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmdistill.config import STUDY_ARMS  # noqa: E402

DEFAULT_CORPUS = (
    "the built-in offline corpus (Wikipedia sample, Shakespeare, King James Bible; held out: 28 Wikipedia articles, "
    "6 Shakespeare texts, 8 Bible books)"
)
HEADLINE = "mixture"


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


def _percent(mean: float | None, std: float | None) -> str:
    return plus_minus(mean, std, 100, 1) + ("" if mean is None else " %")


def _multiplier(arm: dict[str, Any]) -> str:
    """The token multiplier of an arm: mean ± std over seeds, or the bound where a seed lies outside `random`'s
    budgets."""
    if arm.get("token_multiplier") is not None:
        return plus_minus(arm["token_multiplier"], arm["token_multiplier_std"], digits=2) + "×"
    entries = arm.get("token_multiplier_per_seed") or []
    outside = [e for e in entries if e["range"] in ("above", "below")]
    if not outside:
        return "—"
    bound = max(e["value"] for e in outside) if outside[0]["range"] == "above" else min(e["value"] for e in outside)
    return f"{'>' if outside[0]['range'] == 'above' else '<'} {bound:.2f}× (seed {outside[0]['seed']})"


def headline_table(results: dict[str, Any], budget: str | None = None) -> str:
    """The Markdown table of one budget's arms (default: the largest reported): held-out loss and gap closed on the
    training mixture, then on every source scored on its own, perplexity, `random`'s token multiplier (mean ±
    standard deviation over seeds)."""
    arms = results["budgets"][budget] if budget else results["arms"]
    teacher = results["teacher"]
    sets = [HEADLINE, *results["config"]["final_eval_sources"]]
    head = ["arm", "what it is", "seeds"]
    for name in sets:
        head += [f"{name}: loss (nats/token)", f"{name}: gap closed"]
    head += ["perplexity (mixture)", "gap closed, ppl", "tokens `random` needs", "step-0 loss", "time per run"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, arm in arms.items():
        cells = [f"`{name}`", STUDY_ARMS[name].description, str(len(arm["seeds"]))]
        for s in sets:
            score = arm["scores"][s]
            cells += [
                plus_minus(score["loss"], score["loss_std"]),
                _percent(score["gap_closed"], score["gap_closed_std"]),
            ]
        cells += [
            plus_minus(arm["val_ppl"], arm["val_ppl_std"], digits=1),
            _percent(arm["gap_closed_ppl"], arm["gap_closed_ppl_std"]),
            _multiplier(arm),
            f"{arm['step0_val_loss']:.2f}",
            f"{arm['seconds'] / 60:.1f} min",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    share = "—" if undefined_gap_seeds(results) else "100 %"
    cells = ["teacher", f"{teacher['name']}, {teacher['parameters'] / 1e6:.1f}M parameters", "—"]
    for s in sets:
        cells += [f"{teacher['scores'][s]:.3f}", share]
    cells += [f"{teacher['val_ppl']:.1f}", share, "—", "—", "—"]
    rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def budget_table(results: dict[str, Any]) -> str:
    """Gap closed on the training mixture (mean ± std over seeds) and `random`'s token multiplier, arm by budget."""
    budgets = list(results["budgets"])
    names = list(dict.fromkeys(name for arms in results["budgets"].values() for name in arms))
    head = ["arm", *(f"{int(b):,} tokens" for b in budgets)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [f"`{name}`"]
        for b in budgets:
            arm = results["budgets"][b].get(name)
            cells.append(
                "—"
                if arm is None
                else f"{_percent(arm['gap_closed_loss'], arm['gap_closed_loss_std'])}; {_multiplier(arm)}"
            )
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def extension_table(results: dict[str, Any]) -> str | None:
    """Each extension against the arm it extends, paired by seed: the difference in gap closed (points) and the
    ratio of the mean gaps, per budget and held-out set; None without extensions."""
    rows = []
    for budget, arms in results["budgets"].items():
        for name, arm in arms.items():
            comparison = arm.get("vs_extended")
            if not comparison:
                continue
            for s, c in comparison["sets"].items():
                ratio = "—" if c["ratio"] is None else f"{c['ratio']:.2f}×"
                rows.append(
                    f"| {int(budget):,} | `{name}` vs `{comparison['arm']}` | {s} | "
                    f"{plus_minus(c['difference'], c['difference_std'], 100, 1)} | {ratio} | "
                    f"{len(comparison['seeds'])} |"
                )
    if not rows:
        return None
    head = "| budget | comparison | held-out set | gap closed difference (points, paired) | ratio of gaps | seeds |"
    return "\n".join([head, "|---|---|---|---|---|---|", *rows])


def machines_text(machines: list[dict[str, Any]]) -> str:
    """The CPUs of a study's runs with their speed flags (`study_results.machines_of`), for the setup paragraph."""
    return "; ".join(f"{m['model']} ({', '.join(m['flags']) or 'no AVX2'})" for m in machines)


def device_text(env: dict[str, Any]) -> str:
    """The device of a results' environment as a phrase: its GPU, else the CPU and torch's thread count."""
    threads = env["cpu_threads"]
    return env["gpu"] or f"CPU ({threads} thread{'s' * (threads != 1)})"


def _setup_text(results: dict[str, Any]) -> str:
    config, setup, student = results["config"], results["setup"], results["student"]
    shape, env, teacher = student["shape"], results["environment"], results["teacher"]
    device = device_text(env)
    kd_arms = sorted(
        {name for arms in results["budgets"].values() for name, arm in arms.items() if arm["loss"] != "ce"}
    )
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
            "next-token distributions (plus the remaining mass) over exactly the blocks a budget's runs read."
        )
    hkd_arms = [name for name in kd_arms if STUDY_ARMS[name].loss.endswith("+hkd")]
    if hkd_arms:
        kd_text += (
            f" Hidden-state arms ({', '.join(f'`{a}`' for a in hkd_arms)}) add {config['hidden_weight']} × (1 − "
            "cosine) between the student's residual stream after its middle and last blocks and the teacher's after "
            "the matching blocks times the GUIDE projection, cached in the same pass."
        )
    corpus = ", ".join(config["data"]) if config["data"] else DEFAULT_CORPUS
    budgets = ", ".join(f"{b['train_tokens_per_run']:,} ({b['max_steps']} steps)" for b in setup["budgets"].values())
    weights = ", ".join(f"{source} {100 * w:.1f} %" for source, w in results["scoring"]["mixture_weights"].items())
    tokens = ", ".join(f"{source} {n:,}" for source, n in results["scoring"]["score_tokens"].items())
    commit = (env["git"]["commit"] or "unknown")[:10]
    return (
        f"**Setup.** Teacher: {teacher['name']}, {teacher['parameters'] / 1e6:.1f}M parameters. Student: the teacher's "
        f"architecture at hidden size {shape['hidden_size']}, {shape['num_layers']} blocks, {shape['num_heads']} "
        f"query heads ({shape['num_kv_heads']} key/value) of width {shape['head_dim']}, MLP "
        f"{shape['intermediate_size']}, vocabulary {shape['vocab_size']:,}: {student['parameters'] / 1e6:.1f}M "
        f"parameters. Every arm runs at every token budget — {budgets} of {config['batch_size']} sequences × "
        f"{config['seq_len']} tokens — of {corpus}, in the same order for every run, with AdamW (lr {config['lr']}, "
        f"{config['warmup_steps']} warmup steps, cosine decay to {config['min_lr_ratio']}× lr at the budget's end, "
        f"weight decay {config['weight_decay']}, clipping at {config['grad_clip']}).{kd_text} Seeds change only the "
        "student's random initialization.\n\n"
        "**Scoring.** Every model, the teacher included, is scored after training on held-out documents: the "
        f"headline is the training mixture (the mean of the sources' held-out losses weighted by their share of the "
        f"training tokens: {weights}), measured on {tokens} held-out tokens. The gap closed is "
        "(L_random − L_arm) / (L_random − L_teacher), paired with the `random` run of the same seed. The loss form "
        "comes first: the perplexity form is dominated by `random`'s large perplexity. `tokens random needs` is how "
        "many times the budget `random` needs to reach the arm's mixture loss, interpolated in log-tokens between "
        "`random`'s final losses at the budgets. Spreads are standard deviations over seeds (none with one seed). "
        f"Ran on {device} [{machines_text(results['machines'])}], "
        f"{precision_text(env)}, torch {env['torch']}, lmdistill {env['lmdistill']} "
        f"(commit {commit}); {results['timing']['run_seconds'] / 3600:.1f} h of training in all."
    )


def write_report(results: dict[str, Any], path: Path) -> None:
    """Write `report.md`: the setup and scoring in paragraphs, the tables per budget, and the plots."""
    text = [_setup_text(results)]
    warning = gap_warning(results)
    if warning:
        text.append(warning)
    if results["runs_finished"] < results["runs_planned"]:
        text.append(
            f"**Partial results:** {results['runs_finished']} of the {results['runs_planned']} planned runs have "
            "finished; each arm shows the seeds finished so far."
        )
    if len(results["budgets"]) > 1:
        text += [
            "## Gap closed on the training mixture, by budget (and the tokens `random` needs)",
            budget_table(results),
        ]
        text.append("![gap closed against the token budget](budgets.png)")
    for budget in results["budgets"]:
        text += [f"## {int(budget):,} training tokens per run", headline_table(results, budget)]
    extensions = extension_table(results)
    if extensions:
        text += ["## Extensions against the arm they extend", extensions]
    text += [
        "Step-0 loss is the held-out loss of the initialized student before training: GUIDE's assembled block "
        "and tied PCA head start over-confident, so judge initializations after training, not at step 0.",
        f"![held-out perplexity against tokens seen, {results['setup']['largest_reported']:,}-token runs](curves.png)",
        "![share of the teacher–student gap closed](gap.png)",
    ]
    teacher, student = results["teacher"], results["student"]
    title = f"{teacher['name']} → {student['parameters'] / 1e6:.1f}M student"
    path.write_text("\n\n".join([f"# Study: GUIDE initialization and distillation, {title}", *text]) + "\n")


def write_plots(results: dict[str, Any], out: Path) -> None:
    """Write `curves.png` (held-out perplexity against tokens seen, largest budget), `gap.png` (gap closed per arm,
    largest budget) and `budgets.png` (gap closed against the budget)."""
    _plot_curves(results, out / "curves.png")
    _plot_gap(results, out / "gap.png")
    _plot_budgets(results, out / "budgets.png")


def _plot_curves(results: dict[str, Any], path: Path) -> None:
    arms, teacher_ppl = results["arms"], math.exp(results["teacher"]["curve_val_loss"])
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
    ax.axhline(teacher_ppl, color="black", linestyle="--", linewidth=1, label=f"teacher ({teacher_ppl:.1f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Held-out perplexity during training (mean over seeds; band: min–max)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_gap(results: dict[str, Any], path: Path) -> None:
    arms, colors = results["arms"], plt.get_cmap("tab10")
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
    fig.savefig(path)
    plt.close(fig)


def _plot_budgets(results: dict[str, Any], path: Path) -> None:
    sets = [HEADLINE, *results["config"]["final_eval_sources"]]
    budgets = [int(b) for b in results["budgets"]]
    names = list(dict.fromkeys(n for arms in results["budgets"].values() for n in arms if n != "random"))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.2), dpi=120, squeeze=False)
    for ax, s in zip(axes[0], sets, strict=True):
        for i, name in enumerate(names):
            points = [(b, results["budgets"][str(b)].get(name)) for b in budgets]
            points = [(b, arm["scores"][s]) for b, arm in points if arm and arm["scores"][s]["gap_closed"] is not None]
            if not points:
                continue
            xs = [b for b, _ in points]
            ys = [100 * score["gap_closed"] for _, score in points]
            errors = [100 * (score["gap_closed_std"] or 0) for _, score in points]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=colors(i + 1), label=name)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens per run")
        ax.set_ylabel(f"gap closed vs random init (%, loss form, {s})")
        ax.set_title(f"held-out {s}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    fig.suptitle("Gap closed against the token budget (error bars: std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
