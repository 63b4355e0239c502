"""The experiment's record and its tables: results.json (every part, with device, date, commit, versions and wall
times) and report.md, both rebuilt from the part cache, so a partial run still reports what it has."""

import datetime
import json
import statistics
from pathlib import Path

from flashmorph.experiments.bench import layout_key
from flashmorph.experiments.cache import PartCache
from flashmorph.experiments.config import ExperimentConfig, layer_budgets
from flashmorph.experiments.metrics import competition_rank, distribution_summary, spearman
from flashmorph.experiments.runner import PARTS
from flashmorph.io.atomic import atomic_write_text
from flashmorph.model.shape import ModelShape

RESULTS = "results.json"
REPORT = "report.md"


def _versions() -> dict:
    from flashmorph.versions import collect_versions

    return collect_versions()


def _corpus() -> dict:
    """Which stdlib text scored perplexity (and trained NLL scoring / distillation): it differs by Python version."""
    from flashmorph.data.stdlib_corpus import corpus_info

    return {split: corpus_info(split) for split in ("train", "eval")}


def method_rows(parts: dict, budgets: list[int]) -> dict:
    """{k: [row per method]}: layers, recall before/after distillation, exhaustive rank, selection cost."""
    baselines = parts.get("baselines")
    if not baselines:
        return {}
    evaluated = (parts.get("evaluate") or {}).get("layouts", {})
    distilled = (parts.get("distill") or {}).get("layouts", {})
    exhaustive = (parts.get("exhaustive") or {}).get("budgets", {})
    out = {}
    for k in budgets:
        rows = []
        population = exhaustive.get(str(k), {}).get("recall")
        for method, layers in baselines["layouts"][str(k)].items():
            key = layout_key(layers)
            before = evaluated.get(key)
            after = (distilled.get(key) or {}).get("evaluation")
            rows.append({"method": method, "full_layers": layers, "key": key, "before": before, "after": after,
                         "rank": competition_rank(before["recall"], population) if before and population else None,
                         "rank_total": len(population) if population else None,
                         "cost": baselines["methods"][method]["cost"]})
        out[str(k)] = rows
    return out


def random_spread(rows: list[dict], stage: str) -> dict | None:
    values = [r[stage]["recall"] for r in rows if r["method"].startswith("random_s") and r[stage]]
    if not values:
        return None
    return {"seeds": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def distill_ranking(rows_by_budget: dict) -> dict:
    """Does the ranking of the layouts hold through distillation? Spearman of recall before vs after, per budget."""
    out = {}
    for k, rows in rows_by_budget.items():
        pairs = {r["key"]: (r["before"]["recall"], r["after"]["recall"]) for r in rows if r["before"] and r["after"]}
        if pairs:
            before, after = zip(*pairs.values())
            out[k] = {"layouts": len(pairs), "spearman": spearman(before, after),
                      "best_before": max(pairs, key=lambda key: pairs[key][0]),
                      "best_after": max(pairs, key=lambda key: pairs[key][1])}
    return out


def build_results(cfg: ExperimentConfig, shape: ModelShape) -> dict:
    cache = PartCache(cfg.out_dir)
    parts = {p: cache.load(p) for p in PARTS}
    budgets = layer_budgets(cfg, shape.num_layers)
    rows = method_rows(parts, budgets)
    exhaustive = (parts.get("exhaustive") or {}).get("budgets", {})
    devices = sorted({p["_device"] for p in parts.values() if p and p.get("_device")})
    return {
        "meta": {"written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "devices": devices, "versions": _versions(), "text": _corpus(),
                 "wall_seconds": {p: d.get("_wall_seconds") for p, d in parts.items() if d},
                 "part_dates": {p: d.get("_date") for p, d in parts.items() if d},
                 "complete": [p for p in PARTS if parts[p]], "missing": [p for p in PARTS if not parts[p]]},
        "config": cfg.to_dict(),
        "shape": {"num_layers": shape.num_layers, "num_heads": shape.num_heads, "vocab_size": shape.vocab_size},
        "budgets": budgets,
        "methods": rows,
        "random_spread": {k: {"before": random_spread(r, "before"), "after": random_spread(r, "after")}
                          for k, r in rows.items()},
        "exhaustive_summary": {k: distribution_summary(v["recall"]) for k, v in exhaustive.items()},
        "distill_ranking": distill_ranking(rows),
        "parts": parts,
    }


# ------------------------------------------------------------------------------------------------ markdown


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _recalls(evaluation: dict | None, lengths: list[int]) -> str:
    if not evaluation:
        return " / ".join("-" for _ in lengths)
    return " / ".join(_pct(evaluation["by_length"].get(str(n), {}).get("recall")) for n in lengths)


def _ppl(evaluation: dict | None) -> str:
    return "-" if not evaluation else f"{evaluation['perplexity']:.2f}"


def _cost(cost: dict) -> str:
    return f"{cost['forward_passes']} / {cost['backward_passes']}"


def to_markdown(results: dict) -> str:
    cfg, meta, parts = results["config"], results["meta"], results["parts"]
    seq_len = cfg["data"]["seq_len"]
    lengths = [seq_len * m for m in cfg["evaluation"]["length_multipliers"]]
    versions = meta["versions"]
    lines = ["# Gate search vs selection baselines", "",
             f"- device: {', '.join(meta['devices']) or '-'}; written {meta['written']}",
             f"- commit {versions.get('flashmorph_git_commit')} (dirty: {versions.get('flashmorph_git_dirty')}); "
             f"torch {versions.get('torch')}, transformers {versions.get('transformers')}",
             f"- teacher: {results['shape']['num_layers']} layers; budgets (full-attention layers): {results['budgets']}",
             f"- wall seconds per part: " + ", ".join(f"{p} {s}" for p, s in meta["wall_seconds"].items()),
             f"- parts missing: {', '.join(meta['missing']) or 'none'}"]
    text = meta.get("text", {}).get("eval")
    if text:
        lines.append(f"- held-out text for perplexity: {text['corpus']} ({text['split']} split, {text['documents']} "
                     f"documents, {text['bytes']} bytes, Python {text['python']}; {text['licence']})")
    lines.append("")
    teacher = (parts.get("teacher") or {}).get("report") or {}
    teacher_eval = (parts.get("evaluate") or {}).get("teacher")
    trained = (f"recall {_pct(teacher['recall_accuracy'])}% on {teacher.get('num_pairs')} pairs, curriculum complete: "
               f"{teacher.get('curriculum_complete')}" if teacher.get("recall_accuracy") is not None
               else "none found next to the teacher")
    lines += ["## Teacher (all softmax)", "",
              f"- training report: {trained}",
              f"- recall at {' / '.join(map(str, lengths))} tokens: {_recalls(teacher_eval, lengths)} %; "
              f"held-out text perplexity {_ppl(teacher_eval)}", ""]
    length_head = "/".join(f"{m}x" for m in cfg["evaluation"]["length_multipliers"])
    for k, rows in results["methods"].items():
        lines += [f"## {k} full-attention layers", "",
                  f"| method | full layers | recall % {length_head} (no distill) | ppl | exhaustive rank | "
                  f"recall % {length_head} (distilled) | ppl (distilled) | passes fwd / bwd | selection s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            rank = "-" if r["rank"] is None else f"{r['rank']} / {r['rank_total']}"
            lines.append(f"| {r['method']} | {r['full_layers']} | {_recalls(r['before'], lengths)} | {_ppl(r['before'])} "
                         f"| {rank} | {_recalls(r['after'], lengths)} | {_ppl(r['after'])} | {_cost(r['cost'])} | "
                         f"{r['cost']['seconds']:.2f} |")
        spread = results["random_spread"][k]
        for stage in ("before", "after"):
            s = spread[stage]
            if s:
                lines.append(f"\nrandom ({s['seeds']} seeds, {stage} distillation): mean {_pct(s['mean'])}%, "
                             f"std {_pct(s['std'])}, range {_pct(s['min'])}-{_pct(s['max'])}%")
        lines.append("")
    if results["exhaustive_summary"]:
        lines += ["## Exhaustive reference (training length, no distillation)", "",
                  "| full layers | layouts | best % | median % | worst % |", "|---|---|---|---|---|"]
        for k, s in results["exhaustive_summary"].items():
            lines.append(f"| {k} | {s['count']} | {_pct(s['best'])} | {_pct(s['median'])} | {_pct(s['worst'])} |")
        lines.append("")
    curves = (parts.get("cost") or {}).get("curves")
    if curves:
        lines += ["## Cost at equal quality (recall % at the training length, no distillation)", "",
                  "| method | compute | passes fwd / bwd | forward-equivalent tokens | seconds | "
                  + " | ".join(f"k={k}" for k in results["budgets"]) + " |",
                  "|---|---|---|---|---|" + "---|" * len(results["budgets"])]
        for method, points in curves.items():
            for p in points:
                compute = f"{p['steps']} steps" if "steps" in p else f"{p['batches']} batches"
                cells = " | ".join(_pct(p["budgets"][str(k)]["recall"]) for k in results["budgets"])
                lines.append(f"| {method} | {compute} | {_cost(p['cost'])} | {p['cost']['forward_equivalent_tokens']} | "
                             f"{p['cost']['seconds']:.2f} | {cells} |")
        lines += ["", "forward-equivalent tokens count a forward+backward pass as 3 forwards.", ""]
    ablations = parts.get("ablations")
    if ablations:
        t = ablations["threshold"]
        lines += ["## Ablations", "",
                  f"- threshold {t['threshold']} on the main gates keeps {t['k']} layers {t['full_layers']}: recall "
                  f"{_recalls(t['evaluation'], lengths)} % (top-k rows above are the budgeted alternative)", "",
                  "| gate search variant | settings | final train acc % | "
                  + " | ".join(f"k={k} layers (recall %)" for k in results["budgets"]) + " |",
                  "|---|---|---|" + "---|" * len(results["budgets"])]
        for name, v in ablations["variants"].items():
            s = v["settings"]
            settings = f"reg {s['reg_weight']}, {s['granularity']}, text {s['text_weight']}"
            cells = " | ".join(f"{v['budgets'][str(k)]['full_layers']} ({_pct(v['budgets'][str(k)]['recall'])})"
                               for k in results["budgets"])
            lines.append(f"| {name} | {settings} | {_pct(v['final_accuracy'])} | {cells} |")
        lines.append("")
    if results["distill_ranking"]:
        lines += ["## Does the ranking hold through distillation?", "",
                  "| full layers | distinct layouts | Spearman (recall before vs after) | best before | best after |",
                  "|---|---|---|---|---|"]
        for k, d in results["distill_ranking"].items():
            rho = "-" if d["spearman"] is None else f"{d['spearman']:.2f}"
            lines.append(f"| {k} | {d['layouts']} | {rho} | {d['best_before']} | {d['best_after']} |")
        lines.append("")
    return "\n".join(lines)


def write_results(cfg: ExperimentConfig, shape: ModelShape) -> tuple[Path, Path]:
    results = build_results(cfg, shape)
    out = Path(cfg.out_dir)
    return (atomic_write_text(out / RESULTS, json.dumps(results, indent=1)),
            atomic_write_text(out / REPORT, to_markdown(results)))
