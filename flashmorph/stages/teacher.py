"""The embedded default's teacher: a tiny Llama-family model trained on associative recall until it retrieves.

A tiny model trained directly on many pairs stalls at a shortcut (it guesses among the values not yet asked,
never matching keys). A curriculum over the number of pairs (2 -> 3 -> 4 -> 6 -> 8) that advances once the
running train recall reaches `advance_accuracy` gets the 4-layer, hidden-128 default to ~90% recall on 8 pairs
in about 3,000 steps (~3.5 minutes on 2 CPU cores). At hidden 64 the same model usually stays at the shortcut.
"""

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flashmorph.checkpoint.atomic import atomic_write_text
from flashmorph.config import TeacherConfig
from flashmorph.data import DataConfig, RetrievalDataset, TokenSpace
from flashmorph.evaluation.retrieval import answer_hits
from flashmorph.model.tiny import build_tiny_model, tiny_config

log = logging.getLogger(__name__)
REPORT = "teacher_report.json"
MIN_STEPS_PER_STAGE = 20  # the running recall needs a few batches before it means anything


def teacher_data_config(teacher: TeacherConfig, num_pairs: int, seed: int) -> DataConfig:
    """Zoology-style MQAR with no filler: BOS, n x (k v), QUERY, n x (q a): 2 + 4n tokens."""
    config = DataConfig(tasks={"mqar": 1.0}, num_pairs=num_pairs, num_queries=0, kv_separator=False,
                        haystack="vocab", seed=seed)
    config.seq_len = config.min_seq_len("mqar")
    return config


def recall_accuracy(model, dataset: RetrievalDataset, num_samples: int, batch_size: int = 128) -> float:
    """Fraction of answer tokens predicted exactly (greedy) on a held-out split; the same count as
    tools/evaluate.py's token accuracy, so the teacher report and later evaluations agree."""
    model.eval()
    correct = total = 0
    for start in range(0, num_samples, batch_size):
        batch = dataset.batch(range(start, min(start + batch_size, num_samples)))
        hits, tokens = answer_hits(model, batch["input_ids"], batch["labels"])
        correct += int(hits.sum())
        total += int(tokens.sum())
    model.train()
    return correct / max(total, 1)


def _batch_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    targets = labels[:, 1:]
    mask = targets != -100
    return (logits[:, :-1].argmax(-1)[mask] == targets[mask]).float().mean().item()


def _lr_at(step: int, teacher: TeacherConfig) -> float:
    """Linear warm-up, then constant: each curriculum stage needs the full rate to learn its harder task."""
    return teacher.lr * min(1.0, (step + 1) / teacher.warmup_steps)


def train_teacher(teacher: TeacherConfig, out_dir: str | Path, show_progress: bool = True) -> dict:
    """Build, train and save the tiny teacher as a HF directory; returns (and writes) its report."""
    out_dir = Path(out_dir)
    report_file = out_dir / REPORT
    if report_file.is_file() and (out_dir / "config.json").is_file():
        log.info("reusing the trained teacher in %s", out_dir)
        return json.loads(report_file.read_text())

    config = tiny_config(teacher.family, teacher.num_layers, teacher.hidden_size, teacher.num_heads,
                         teacher.num_kv_heads, teacher.vocab_size)
    torch.manual_seed(teacher.seed)
    model = build_tiny_model(config, seed=teacher.seed).train()
    space = TokenSpace.synthetic(teacher.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=teacher.lr, weight_decay=0.01)
    start = time.perf_counter()
    bar = tqdm(total=teacher.max_steps_per_stage * len(teacher.curriculum), desc="teacher",
               disable=not show_progress)
    step, stages = 0, []
    for stage, num_pairs in enumerate(teacher.curriculum):
        train_set = RetrievalDataset(teacher_data_config(teacher, num_pairs, teacher.seed + stage), space)
        running = 0.0  # EMA of the train-batch recall; the stage ends when it reaches advance_accuracy
        for stage_step in range(1, teacher.max_steps_per_stage + 1):
            batch = train_set.batch(range(step * teacher.batch_size, (step + 1) * teacher.batch_size))
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, teacher)
            out = model(input_ids=batch["input_ids"], labels=batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            running = 0.9 * running + 0.1 * _batch_recall(out.logits.detach(), batch["labels"])
            bar.update(1)
            bar.set_postfix(pairs=num_pairs, loss=f"{out.loss.item():.3f}", recall=f"{running:.2f}")
            if running >= teacher.advance_accuracy and stage_step >= MIN_STEPS_PER_STAGE:
                break
        bar.total -= teacher.max_steps_per_stage - stage_step  # the bar counts the steps actually left
        bar.refresh()
        stages.append({"num_pairs": num_pairs, "steps": stage_step, "train_recall": round(running, 4)})
        log.info("teacher stage %d: %d pairs, %d steps, running train recall %.3f",
                 stage, num_pairs, stage_step, running)
    bar.close()
    train_seconds = time.perf_counter() - start
    total_steps = step

    final_pairs = teacher.curriculum[-1]
    eval_set = RetrievalDataset(teacher_data_config(teacher, final_pairs, teacher.seed), space, split="eval")
    accuracy = recall_accuracy(model, eval_set, teacher.eval_samples)
    chance = 1.0 / len(space.value_ids)
    report = {
        "recall_accuracy": accuracy,
        "chance_accuracy": chance,
        "num_pairs": final_pairs,
        "eval_samples": teacher.eval_samples,
        "train_steps": total_steps,
        "stages": stages,
        "train_seconds": round(train_seconds, 2),
        "teacher": dataclasses.asdict(teacher),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    atomic_write_text(report_file, json.dumps(report, indent=2))  # written last: marks the teacher complete
    log.info("teacher: %.1f%% recall on %d pairs (chance %.1f%%) after %d steps, %.1f s",
             100 * accuracy, final_pairs, 100 * chance, total_steps, train_seconds)
    return report
