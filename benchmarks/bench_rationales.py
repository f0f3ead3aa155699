"""Rationale extraction throughput per attribution method on the default teacher, against Captum's LLM API.

For each method (saliency, input-x-gradient, integrated-gradients), on the first `--limit` examples of a task split
(after `--warmup` untimed ones, run before each measurement):

1. `extract_examples_per_s`: teacher answer + attribution + word selection through `extract_batch` (what
   `lmdistill rationales extract` runs per batch), `--batch-size` examples per call;
2. `attribution_examples_per_s`: `answer_attributions` in batches, the answers fixed (computed once, untimed);
3. `captum_examples_per_s`: the alternative a user would pick, Captum's LLM API (`LLMGradientAttribution` wrapping
   `LayerGradientXActivation` / `LayerIntegratedGradients` on the embedding layer, `--ig-steps` steps), one example
   at a time as that API works, attributing the same answer tokens after the same prompt tokens. The API attributes
   each answer token's log-probability in a pass of its own (one forward/backward per answer token, times the steps
   for integrated gradients, with logits at every position) and sums over the embedding dimension; its sequence
   attribution is the sum over answer tokens. Captum's `LLMGradientAttribution` takes no plain-gradient method
   (`Saliency`), so saliency's Captum entries are null, with the reason in `agreement.captum`.

Agreement, computed outside the timing. Relative errors are max |a - b| / max |b| per example, the worst example,
against a reference written independently of the code under test: one unpadded row, logits at every position,
per-dimension attributions by plain autograd (saliency, input-x-gradient) or Captum's plain `IntegratedGradients`
on that forward (integrated gradients, the same steps and quadrature).

- `ours_vs_reference`: our scores against the reference reduced the same way (Σ_d |·|).
- `captum_vs_reference`: Captum's scores against the reference summed over the embedding dimension (Σ_d ·); for
  integrated gradients the reference then starts from Captum's baseline, the embedding of token id 0
  (`TextTokenInput`'s default), where ours (and `ours_vs_reference`) starts from the pad token's (`--ig-baseline
  token`).
- `spearman`: mean over examples of the rank correlation of our per-prompt-token scores with the magnitude of
  Captum's. Below 1 by construction: the reductions differ (Σ_d |·| against |Σ_d ·|) and, for integrated gradients,
  so do the baselines. `spearman_reduction_alone`: the same correlation between Σ_d |·| and |Σ_d ·| of Captum's
  reference, i.e. what the reductions alone account for.
- `captum_completeness_err` (integrated gradients): |Σ Captum scores − (log p(answer | prompt) − log p(answer |
  baseline prompt))| / |that difference|, the worst example: how far `--ig-steps` steps are from the integral.

Run: `.venv/bin/python benchmarks/bench_rationales.py` (the last printed line is one JSON object).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, get_args

import captum
import torch
from captum.attr import (
    IntegratedGradients,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    LLMGradientAttribution,
    Saliency,
    TextTokenInput,
)

from lmdistill.commands.rationales_extract import extract_batch
from lmdistill.config import AttributionMethod, RationaleExtractConfig
from lmdistill.models.load import load_teacher
from lmdistill.provenance import environment
from lmdistill.rationales.answers import encode_answer, teacher_answers
from lmdistill.rationales.attribution import answer_attributions, choice_logprobs
from lmdistill.rationales.tasks import is_correct, load_task, render_prompt

METHODS: tuple[str, ...] = get_args(AttributionMethod)
CAPTUM_METHODS = {"saliency": Saliency, "input-x-gradient": LayerGradientXActivation,
                  "integrated-gradients": LayerIntegratedGradients}  # fmt: skip
CAPTUM_BASELINE_ID = 0  # TextTokenInput's default baseline token

Row = tuple[str, list[int], list[int]]  # prompt text, prompt ids, answer ids


def captum_supports(method: str) -> bool:
    """Whether Captum's LLMGradientAttribution accepts this method's attribution class."""
    return issubclass(CAPTUM_METHODS[method], LLMGradientAttribution.SUPPORTED_METHODS)


def timed(fn: Callable[[list], list], items: list, warmup: list) -> tuple[float, list]:
    """Examples per second of ``fn(items)`` after an untimed ``fn(warmup)``, and what ``fn(items)`` returned."""
    fn(warmup)
    start = time.perf_counter()
    out = fn(items)
    return len(items) / (time.perf_counter() - start), out


def batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_extract(model, tokenizer, config: RationaleExtractConfig, examples: list) -> list[dict]:
    return [r for b in batches(examples, config.batch_size) for r in extract_batch(model, tokenizer, b, config)]


def run_ours(model, method: str, batch_size: int, ig_steps: int, pad_id: int, rows: list[Row]) -> list[torch.Tensor]:
    out = []
    for b in batches(rows, batch_size):
        scores = answer_attributions(
            model, [p for _, p, _ in b], [a for _, _, a in b], method=method, ig_steps=ig_steps, pad_id=pad_id
        )
        out.extend(s.detach().cpu() for s in scores)
    return out


def run_captum(llm_attr: LLMGradientAttribution, tokenizer, kwargs: dict, rows: list[Row]) -> list[torch.Tensor]:
    out = []
    for text, prompt, answer in rows:
        inp = TextTokenInput(text, tokenizer, baselines=CAPTUM_BASELINE_ID)
        if inp.inp_tensor[0].tolist() != prompt:
            raise SystemExit(f"Captum tokenized a prompt differently from extract: {text[:80]!r}")
        out.append(llm_attr.attribute(inp, target=torch.tensor(answer), **kwargs).seq_attr.detach().cpu())
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (ties broken by position)."""
    ra, rb = (x.double().argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def mean_spearman(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(spearman(x, y) for x, y in zip(a, b)) / len(a)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def reference(model, prompt: list[int], answer: list[int], method: str, ig_steps: int, baseline_id: int | None = None):
    """Per-dimension attributions ``[P, d]`` of log p(answer | prompt) to the prompt's token embeddings e, written
    independently of the code under test: one unpadded row, logits at every position, plain autograd (saliency: the
    signed gradient g; input-x-gradient: e g) or Captum's `IntegratedGradients` on that forward (from zero vectors,
    or from the embedding of ``baseline_id``, the answer tokens held)."""
    ids = torch.tensor([prompt + answer], device=model.device)
    targets = torch.tensor(answer, device=model.device)
    embeds = model.get_input_embeddings()(ids).detach()

    def logprob(z: torch.Tensor) -> torch.Tensor:  # [N, T, d] -> [N]
        logits = model(inputs_embeds=z).logits[:, len(prompt) - 1 : -1].float()  # predicts the answer tokens
        return torch.log_softmax(logits, -1).gather(-1, targets.expand(len(z), -1)[..., None]).sum((1, 2))

    if method == "integrated-gradients":
        baselines = embeds.clone()
        baselines[0, : len(prompt)] = 0.0 if baseline_id is None else model.get_input_embeddings().weight[baseline_id]
        attr = IntegratedGradients(logprob).attribute(embeds, baselines=baselines, n_steps=ig_steps)
    else:
        embeds.requires_grad_()
        (grad,) = torch.autograd.grad(logprob(embeds).sum(), embeds)
        attr = grad if method == "saliency" else embeds.detach() * grad
    return attr[0, : len(prompt)].detach().cpu()


def captum_completeness_err(model, rows: list[Row], theirs: list[torch.Tensor], pad_id: int) -> float:
    """Worst |Σ attributions − (f(x) − f(baseline))| / |f(x) − f(baseline)|, f = log p(answer | prompt)."""
    prompts = [p for _, p, _ in rows] + [[CAPTUM_BASELINE_ID] * len(p) for _, p, _ in rows]
    answers = [[a] for _, _, a in rows] * 2
    f = torch.cat(choice_logprobs(model, prompts, answers, batch_size=1, pad_id=pad_id)).cpu()
    delta = f[: len(rows)] - f[len(rows) :]
    return max(float((t.sum() - d).abs() / d.abs().clamp(min=1e-30)) for t, d in zip(theirs, delta))


def measure(args: argparse.Namespace, method: str, model, tokenizer, data: dict[str, Any]) -> dict[str, Any]:
    """Timings and agreement of one method."""
    pad_id = data["pad_id"]
    rows, warm_rows = data["rows"], data["warm_rows"]
    extract_rate, _ = timed(
        partial(run_extract, model, tokenizer, data["config"](method)), data["examples"], data["warm"]
    )
    attribution_rate, ours = timed(
        partial(run_ours, model, method, args.batch_size, args.ig_steps, pad_id), rows, warm_rows
    )
    agreement: dict[str, Any] = {}
    refs = [reference(model, p, a, method, args.ig_steps, pad_id) for _, p, a in rows]  # our token baseline
    agreement["ours_vs_reference"] = max(rel_err(o, r.abs().sum(-1)) for o, r in zip(ours, refs))

    captum_rate = None
    if args.no_captum:
        agreement["captum"] = "skipped (--no-captum)"
    elif not captum_supports(method):
        supported = ", ".join(c.__name__ for c in LLMGradientAttribution.SUPPORTED_METHODS)
        agreement["captum"] = (
            f"{CAPTUM_METHODS[method].__name__} is not accepted by LLMGradientAttribution in captum "
            f"{captum.__version__} (it takes {supported})"
        )
    else:
        llm_attr = LLMGradientAttribution(CAPTUM_METHODS[method](model, model.get_input_embeddings()), tokenizer)
        kwargs = {"n_steps": args.ig_steps} if method == "integrated-gradients" else {}
        captum_rate, theirs = timed(partial(run_captum, llm_attr, tokenizer, kwargs), rows, warm_rows)
        agreement["spearman"] = mean_spearman(ours, [t.abs() for t in theirs])
        if method == "integrated-gradients":  # Captum integrates from its own baseline
            refs = [reference(model, p, a, method, args.ig_steps, CAPTUM_BASELINE_ID) for _, p, a in rows]
        agreement["captum_vs_reference"] = max(rel_err(t, r.sum(-1)) for t, r in zip(theirs, refs))
        agreement["spearman_reduction_alone"] = mean_spearman(
            [r.abs().sum(-1) for r in refs], [r.sum(-1).abs() for r in refs]
        )
        if method == "integrated-gradients":
            agreement["captum_completeness_err"] = captum_completeness_err(model, rows, theirs, pad_id)
    return {
        "extract_examples_per_s": extract_rate,
        "attribution_examples_per_s": attribution_rate,
        "captum_examples_per_s": captum_rate,
        "speedup_vs_captum": attribution_rate / captum_rate if captum_rate else None,
        "agreement": agreement,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--task", default="cqa")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data", default=None, help="JSON-lines file instead of the shared data")
    parser.add_argument("--limit", type=int, default=16, help="timed examples (the first N after the warm-up ones)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=RationaleExtractConfig.batch_size)
    parser.add_argument("--ig-steps", type=int, default=RationaleExtractConfig.ig_steps)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--warmup", type=int, default=1, help="untimed examples before each measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-captum", action="store_true", help="skip the Captum LLM API comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    everything = load_task(args.task, args.split, data=args.data, limit=args.limit + args.warmup)
    if len(everything) <= args.warmup:
        raise SystemExit(f"{args.task}/{args.split} has no examples beyond the {args.warmup} warm-up ones")
    start = time.perf_counter()
    teacher = load_teacher(args.teacher)
    load_s = time.perf_counter() - start
    model, tokenizer = teacher.model, teacher.tokenizer  # fp32, eval mode, parameters frozen
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # as run_extract does
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def config(method: str) -> RationaleExtractConfig:
        return RationaleExtractConfig(
            teacher=args.teacher, task=args.task, split=args.split, data=args.data, out="unused.jsonl", k=args.k,
            method=method, batch_size=args.batch_size, ig_steps=args.ig_steps, progress=False,
        )  # fmt: skip

    # The teacher's answers, once and untimed, for the attribution-only and Captum measurements.
    texts = [render_prompt(e, config(METHODS[0]).prompt_template).text for e in everything]
    prompt_ids = tokenizer(texts)["input_ids"]
    start = time.perf_counter()
    with torch.inference_mode():
        answers = [
            a
            for b in batches(range(len(everything)), args.batch_size)
            for a in teacher_answers(
                model, tokenizer, [everything[i] for i in b], [prompt_ids[i] for i in b], config(METHODS[0]), pad_id
            )
        ]
    answers_s = time.perf_counter() - start
    accuracy = sum(is_correct(a, e) for a, e in zip(answers, everything)) / len(everything)
    rows = [(t, p, encode_answer(tokenizer, a)) for t, p, a in zip(texts, prompt_ids, answers)]
    n_warm = args.warmup
    data = {
        "config": config, "pad_id": pad_id, "warm": everything[:n_warm], "examples": everything[n_warm:],
        "warm_rows": rows[:n_warm], "rows": rows[n_warm:],
    }  # fmt: skip
    results = {method: measure(args, method, model, tokenizer, data) for method in args.methods}

    n = len(data["rows"])
    print(
        f"teacher {teacher.name}: loaded in {load_s:.1f} s; {n} examples of {args.task}/{args.split} "
        f"(+{n_warm} warm-up), answers in {answers_s:.1f} s, teacher accuracy {accuracy:.2f}; batch "
        f"{args.batch_size}, IG steps {args.ig_steps}, {model.device}, {torch.get_num_threads()} threads"
    )
    columns = (("extract ex/s", "extract_examples_per_s", ".3f"), ("attrib ex/s", "attribution_examples_per_s", ".3f"),
               ("captum ex/s", "captum_examples_per_s", ".3f"), ("speedup", "speedup_vs_captum", ".2f"),
               ("spearman", "spearman", ".3f"), ("ours err", "ours_vs_reference", ".1e"),
               ("captum err", "captum_vs_reference", ".1e"))  # fmt: skip
    print(f"{'method':22s}" + "".join(f"{title:>13s}" for title, _, _ in columns))
    for method, r in results.items():
        values = {**r, **r["agreement"]}
        print(f"{method:22s}" + "".join(
            f"{values[key]:13{fmt}}" if isinstance(values.get(key), float) else f"{'-':>13s}" for _, key, fmt in columns
        ))  # fmt: skip
    shown = {key for _, key, _ in columns}
    for method, r in results.items():
        extra = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in r["agreement"].items()
                 if k not in shown]  # fmt: skip
        if extra:
            print(f"{method}: " + "; ".join(extra))
    env = environment()
    print(json.dumps({
        "task": args.task,
        "split": args.split,
        "examples": n,
        "warmup": n_warm,
        "k": args.k,
        "batch_size": args.batch_size,
        "ig_steps": args.ig_steps,
        "reduction": "l1",
        "teacher_accuracy": accuracy,
        "answers_s": answers_s,
        "methods": results,
        "teacher": teacher.name,
        "teacher_load_s": load_s,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "torch": env["torch"],
        "transformers": env["transformers"],
        "captum": captum.__version__,
        "git": env["git"],
        "script": Path(__file__).name,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
