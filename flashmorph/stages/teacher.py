"""The embedded teacher: a small Llama-family model trained here on associative recall (plus, optionally, natural
text) until it retrieves, so that gate search has a model whose layers really do different work.

A model trained directly on many pairs stalls at a shortcut (it guesses among the values not yet asked, never
matching keys). A curriculum over the number of pairs (2 -> 3 -> 4 -> 6 -> 8) that advances once the running train
recall reaches `advance_accuracy` gets the 4-layer, hidden-128 default to ~90% recall on 8 pairs in about 3,000
steps (~3.5 minutes on 2 CPU cores). Deeper teachers stall at the same shortcut with this recipe alone; text windows
beside the retrieval batch (`text_batch_size`, bytes of the Python standard library's sources) and a text-only
warm-up (`text_steps`) are options for such teachers (recipes/experiments/proxy_teacher.yaml; docs/gate_search.md,
the selection experiment).

The stage runs on the GPU when there is one, logs every `log_every` steps, writes a resumable checkpoint every
`checkpoint_every` steps (a rerun continues from it, bit for bit), and stops cleanly on SIGTERM/SIGUSR1.
Its report says whether every curriculum stage advanced; `require_teacher` refuses a teacher that did not.
"""

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from flashmorph.checkpoint import atomic
from flashmorph.config import TeacherConfig
from flashmorph.data import DataConfig, RetrievalDataset, TokenSpace
from flashmorph.data.byte_tokenizer import ByteTokenizer
from flashmorph.errors import FlashMorphError, Preempted
from flashmorph.evaluation.retrieval import answer_hits
from flashmorph.io import atomic as io_atomic
from flashmorph.model.tiny import build_tiny_model, tiny_config
from flashmorph.parallel.quiet import no_transformers_progress_bars
from flashmorph.run_dir import CHECKPOINTS_DIR, TEACHER_REPORT_NAME
from flashmorph.training.preemption import PreemptionGuard

log = logging.getLogger(__name__)
MIN_STEPS_PER_STAGE = 20  # the running recall needs a few batches before it means anything
TEACHER_NOT_READY_EXIT_CODE = 3  # distinct from 2 (bad recipe): the recipe was fine, the teacher did not learn
_TEXT_STREAM_TAG = 0x7E47  # keeps the text windows' random stream apart from the retrieval streams of one seed


class TeacherNotReady(FlashMorphError):
    """The teacher's curriculum did not finish: gate search on it would rank layers of a model that cannot retrieve."""

    exit_code = TEACHER_NOT_READY_EXIT_CODE


def teacher_data_config(teacher: TeacherConfig, num_pairs: int, seed: int) -> DataConfig:
    """Zoology-style MQAR with no filler: BOS, n x (k v), QUERY, n x (q a): 2 + 4n tokens."""
    config = DataConfig(tasks={"mqar": 1.0}, num_pairs=num_pairs, num_queries=0, kv_separator=False,
                        haystack="vocab", seed=seed)
    config.seq_len = config.min_seq_len("mqar")
    return config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FlashMorphError("teacher.device=cuda but torch sees no CUDA device; use teacher.device=auto or cpu")
    return torch.device(name)


def _autocast(device: torch.device):
    # bf16 matmuls on the GPU (fp32 master weights and AdamW state); CPU stays fp32, so CPU runs are unchanged
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def recall_accuracy(model, dataset: RetrievalDataset, num_samples: int, batch_size: int = 128) -> float:
    """Fraction of answer tokens predicted exactly (greedy) on a held-out split; the same count as
    tools/evaluate.py's token accuracy, so the teacher report and later evaluations agree."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    with _autocast(device):
        for start in range(0, num_samples, batch_size):
            batch = dataset.batch(range(start, min(start + batch_size, num_samples)))
            hits, tokens = answer_hits(model, batch["input_ids"].to(device), batch["labels"])  # labels stay on the CPU
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


# ------------------------------------------------------------------------------------------------ text windows


class TextWindows:
    """Windows of `seq_len` tokens from the stdlib-source byte stream; window set of step s is a pure function of
    (seed, s), so a resumed run sees the same text."""

    def __init__(self, space: TokenSpace, split: str, seq_len: int, seed: int):
        from flashmorph.data.stdlib_corpus import byte_stream

        byte_ids = ByteTokenizer(space)._ids_of_byte
        self.tokens = torch.from_numpy(byte_stream(split, byte_ids, separator_id=space.bos_id))
        self.seq_len, self.seed = seq_len, seed
        if self.tokens.numel() <= seq_len:
            raise FlashMorphError(f"teacher.text_seq_len={seq_len} is longer than the {split} text corpus")

    def batch(self, step: int, size: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, _TEXT_STREAM_TAG, step])
        starts = rng.integers(0, self.tokens.numel() - self.seq_len, size=size)
        return torch.stack([self.tokens[s:s + self.seq_len] for s in starts.tolist()])  # [size, seq_len]


@torch.no_grad()
def text_perplexity(model, windows: TextWindows, num_windows: int = 256, batch_size: int = 64) -> float:
    """exp(mean next-token NLL) over `num_windows` held-out windows (one byte = one token)."""
    model.eval()
    device = next(model.parameters()).device
    nll = count = 0.0
    with _autocast(device):
        for b in range(0, num_windows, batch_size):
            ids = windows.batch(b // batch_size, min(batch_size, num_windows - b)).to(device)
            logits = model(input_ids=ids).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                     reduction="sum").item()
            count += ids[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------------------ checkpoints


def _save_state(root: Path, step: int, model, optimizer, progress: dict) -> None:
    """model + AdamW state as safetensors (no pickle), progress as JSON, sealed atomically as step_N."""
    staging = atomic.prepare_staging(root, step)
    io_atomic.atomic_save_safetensors({k: v.detach().cpu() for k, v in model.state_dict().items()},
                                      staging / "model.safetensors")
    optim = {}
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        for key, value in optimizer.state.get(param, {}).items():
            optim[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().reshape(-1) if key == "step" else \
                value.detach().cpu()
    io_atomic.atomic_save_safetensors(optim, staging / "optimizer.safetensors")
    io_atomic.atomic_write_text(staging / "progress.json", json.dumps(progress, indent=2))
    atomic.finalize(root, step)
    atomic.prune(root, keep_last=1)


def _load_state(ckpt: Path, model, optimizer, device: torch.device) -> dict:
    atomic.verify(ckpt)
    model.load_state_dict(io_atomic.load_safetensors_verified(ckpt / "model.safetensors", device=str(device)))
    tensors = io_atomic.load_safetensors_verified(ckpt / "optimizer.safetensors", device=str(device))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        state = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.split(".", 1)[0] == str(index)}
        if state:
            state["step"] = state["step"].reshape(()).float().cpu()  # AdamW keeps `step` as a CPU scalar tensor
            optimizer.state[param] = state
    return json.loads((ckpt / "progress.json").read_text())


def _latest(root: Path, teacher: TeacherConfig) -> Path | None:
    """The latest complete checkpoint of this same teacher config; a checkpoint of another config is refused."""
    if not root.is_dir():
        return None
    ckpt = atomic.latest_complete(root)
    if ckpt is None:
        return None
    saved = json.loads((ckpt / "progress.json").read_text())["teacher"]
    if saved != dataclasses.asdict(teacher):
        changed = sorted(k for k in saved if saved.get(k) != dataclasses.asdict(teacher).get(k))
        raise FlashMorphError(f"{root} holds a teacher checkpoint of another teacher config (differs in {changed}); "
                              "delete that directory or use another run.run_dir")
    return ckpt


# ------------------------------------------------------------------------------------------------ the stage


def train_teacher(teacher: TeacherConfig, out_dir: str | Path, show_progress: bool = True,
                  preemption: PreemptionGuard | None = None) -> dict:
    """Build, train and save the teacher as a HF directory; returns (and writes) its report.

    A complete teacher in `out_dir` is reused; a partial one continues from its latest checkpoint. With
    `preemption`, a stop signal ends training after the current step with a checkpoint and raises `Preempted`.
    """
    out_dir = Path(out_dir)
    report_file = out_dir / TEACHER_REPORT_NAME
    if report_file.is_file() and (out_dir / "config.json").is_file():
        log.info("reusing the trained teacher in %s", out_dir)
        return json.loads(report_file.read_text())

    device = resolve_device(teacher.device)
    config = tiny_config(teacher.family, teacher.num_layers, teacher.hidden_size, teacher.num_heads,
                         teacher.num_kv_heads, teacher.vocab_size, intermediate_size=teacher.intermediate_size)
    torch.manual_seed(teacher.seed)
    model = build_tiny_model(config, seed=teacher.seed).to(device).train()
    space = TokenSpace.synthetic(teacher.vocab_size)
    uses_text = teacher.text_batch_size > 0
    text = TextWindows(space, "train", teacher.text_seq_len, teacher.seed) if uses_text else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=teacher.lr, weight_decay=0.01)

    root = out_dir / CHECKPOINTS_DIR
    # progress: where the curriculum is, so a resumed run continues at the same step of the same stage
    progress = {"step": 0, "stage": 0, "stage_step": 0, "running": 0.0, "stages": [], "train_seconds": 0.0,
                "teacher": dataclasses.asdict(teacher)}
    ckpt = _latest(root, teacher)
    if ckpt is not None:
        progress = _load_state(ckpt, model, optimizer, device)
        log.info("teacher: resuming from %s (step %d, stage %d)", ckpt, progress["step"], progress["stage"])

    planned = teacher.text_steps + teacher.max_steps_per_stage * len(teacher.curriculum)
    bar = tqdm(total=planned, initial=progress["step"], desc="teacher", disable=not show_progress)
    started = time.perf_counter() - progress["train_seconds"]
    log.info("teacher: %d layers, hidden %d, %.1fM parameters on %s; %d text-only steps, curriculum %s pairs",
             teacher.num_layers, teacher.hidden_size, sum(p.numel() for p in model.parameters()) / 1e6, device,
             teacher.text_steps, teacher.curriculum)

    def one_step(batch: dict | None, text_ids: torch.Tensor | None) -> tuple[float, float | None]:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(progress["step"], teacher)
        loss, recall = 0.0, None
        with _autocast(device):
            if batch is not None:
                out = model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device))
                loss = out.loss
                recall = _batch_recall(out.logits.detach(), batch["labels"].to(device))
            if text_ids is not None:
                text_ids = text_ids.to(device)
                loss = loss + model(input_ids=text_ids, labels=text_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress["step"] += 1
        bar.update(1)
        return loss.item(), recall

    def after_step(loss: float, what: str) -> None:
        step = progress["step"]
        if teacher.log_every and step % teacher.log_every == 0:
            log.info("teacher step %d/%d (%s): loss %.3f, running recall %.3f, %.1f steps/s", step, bar.total, what,
                     loss, progress["running"], step / max(time.perf_counter() - started, 1e-9))
        stop = preemption is not None and preemption.received is not None  # main rank only: no collective here
        if (teacher.checkpoint_every and step % teacher.checkpoint_every == 0) or stop:
            progress["train_seconds"] = time.perf_counter() - started
            _save_state(root, step, model, optimizer, progress)
        if stop:
            bar.close()
            raise Preempted(step, atomic.checkpoint_dir(root, step), preemption.reason)

    while progress["step"] < teacher.text_steps:  # text-only warm-up
        loss, _ = one_step(None, text.batch(progress["step"], teacher.text_batch_size))
        bar.set_postfix(text_loss=f"{loss:.3f}")
        after_step(loss, "text")

    while progress["stage"] < len(teacher.curriculum):
        stage, num_pairs = progress["stage"], teacher.curriculum[progress["stage"]]
        train_set = RetrievalDataset(teacher_data_config(teacher, num_pairs, teacher.seed + stage), space)
        advanced, loss = False, float("nan")
        if progress["stage_step"] == 0:
            progress["running"] = 0.0  # each stage's recall starts from zero, so a new harder task must earn it
        while progress["stage_step"] < teacher.max_steps_per_stage:
            # the retrieval stream counts curriculum steps only, so text-only warm-up leaves it unchanged
            step = progress["step"] - teacher.text_steps
            batch = train_set.batch(range(step * teacher.batch_size, (step + 1) * teacher.batch_size))
            text_ids = text.batch(progress["step"], teacher.text_batch_size) if uses_text else None
            loss, recall = one_step(batch, text_ids)
            progress["stage_step"] += 1
            # EMA of the train-batch recall; the stage ends when it reaches advance_accuracy
            progress["running"] = 0.9 * progress["running"] + 0.1 * recall
            bar.set_postfix(pairs=num_pairs, loss=f"{loss:.3f}", recall=f"{progress['running']:.2f}")
            advanced = progress["running"] >= teacher.advance_accuracy and progress["stage_step"] >= MIN_STEPS_PER_STAGE
            if advanced:
                break
            after_step(loss, f"{num_pairs} pairs")
        progress["stages"].append({"num_pairs": num_pairs, "steps": progress["stage_step"],
                                   "train_recall": round(progress["running"], 4), "advanced": advanced})
        bar.total -= teacher.max_steps_per_stage - progress["stage_step"]  # the bar counts the steps actually left
        bar.refresh()
        (log.info if advanced else log.warning)(
            "teacher stage %d: %d pairs, %d steps, running train recall %.3f%s", stage, num_pairs,
            progress["stage_step"], progress["running"],
            "" if advanced else f" - did NOT reach teacher.advance_accuracy={teacher.advance_accuracy}")
        progress["stage"] += 1
        progress["stage_step"] = 0
        if advanced:  # its last step broke out before after_step; a stage that ran out of steps already had it
            after_step(loss, f"{num_pairs} pairs done")
    bar.close()
    train_seconds = time.perf_counter() - started

    final_pairs = teacher.curriculum[-1]
    eval_set = RetrievalDataset(teacher_data_config(teacher, final_pairs, teacher.seed), space, split="eval")
    accuracy = recall_accuracy(model, eval_set, teacher.eval_samples)
    chance = 1.0 / len(space.value_ids)
    report = {
        "recall_accuracy": accuracy,
        "chance_accuracy": chance,
        "num_pairs": final_pairs,
        "eval_samples": teacher.eval_samples,
        "train_steps": progress["step"],
        "stages": progress["stages"],
        "curriculum_complete": all(s["advanced"] for s in progress["stages"]),
        "train_seconds": round(train_seconds, 2),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "teacher": dataclasses.asdict(teacher),
    }
    if uses_text:
        from flashmorph.data.stdlib_corpus import corpus_info

        held_out = TextWindows(space, "eval", teacher.text_seq_len, teacher.seed)
        report["text"] = {**corpus_info("eval"), "perplexity_per_byte": round(text_perplexity(model, held_out), 4)}
    out_dir.mkdir(parents=True, exist_ok=True)
    with no_transformers_progress_bars():  # one shard of a tiny model: a bar would only interrupt ours
        model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    io_atomic.atomic_write_text(report_file, json.dumps(report, indent=2))  # written last: marks the teacher complete
    shutil.rmtree(root, ignore_errors=True)  # the HF directory is the product now; checkpoints only served resume
    log.info("teacher: %.1f%% recall on %d pairs (chance %.1f%%) after %d steps, %.1f s%s",
             100 * accuracy, final_pairs, 100 * chance, progress["step"], train_seconds,
             f"; held-out text perplexity {report['text']['perplexity_per_byte']:.2f} per byte" if uses_text else "")
    return report


def require_teacher(report: dict, teacher: TeacherConfig, teacher_dir: Path) -> None:
    """Refuse a teacher whose curriculum stopped short (unless teacher.require_complete=false: then warn loudly)."""
    stalled = [s for s in report.get("stages", []) if not s.get("advanced", True)]
    if not stalled:
        return
    first = stalled[0]
    message = (f"the teacher in {teacher_dir} never finished its curriculum: stage with {first['num_pairs']} pairs "
               f"ended at running recall {first['train_recall']:.2f} < teacher.advance_accuracy="
               f"{teacher.advance_accuracy} after {first['steps']} steps (held-out recall "
               f"{100 * report['recall_accuracy']:.1f}%)")
    if teacher.require_complete:
        raise TeacherNotReady(f"{message}; raise teacher.max_steps_per_stage or change its recipe, or pass "
                              "--override teacher.require_complete=false to search its gates anyway")
    log.warning("%s; continuing because teacher.require_complete=false - gate rankings of this teacher may not "
                "mean anything", message)
