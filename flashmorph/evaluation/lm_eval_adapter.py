"""lm-eval-harness on any in-memory causal LM (plain, morphed or hybrid) through an `lm_eval.api.model.LM` adapter.

lm_eval is imported only when used; tokenization and rolling windows follow lm-eval's HF backend. No generation."""

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.evaluation.forward import last_logits, model_device

DEFAULT_MAX_LENGTH = 2048  # context cap when neither the config nor the model says otherwise
# exceptions from these packages while running tasks mean "the task's data could not be loaded"
_DATA_ERROR_MODULES = ("datasets", "huggingface_hub", "requests", "urllib3", "httpx", "fsspec")


@dataclass
class LMEvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["piqa", "arc_easy", "hellaswag", "winogrande"])  # task names
    num_fewshot: int | None = None  # None: each task's own default (0 for these four)
    limit: int | None = None  # at most this many documents per task (None = all); for quick checks
    batch_size: int = 8  # requests per forward
    max_length: int | None = None  # context cap in tokens; None = the model's max_position_embeddings
    include_path: str | None = None  # a folder of extra task YAMLs (e.g. local copies of a task's data)
    include_defaults: bool = True  # also index lm-eval's built-in tasks (takes a few seconds)
    bootstrap_iters: int = 1000  # bootstrap resamples for stderr of non-closed-form metrics (lm-eval: 100000)

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("lm-eval tasks are empty; name some, e.g. piqa,arc_easy")
        if self.batch_size < 1:
            raise ConfigError(f"lm-eval batch_size={self.batch_size} must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"lm-eval limit={self.limit} must be >= 1 (or unset for every document)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"lm-eval num_fewshot={self.num_fewshot} must be >= 0")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"lm-eval max_length={self.max_length} must be >= 2")


def require_lm_eval():
    """The lm_eval module, or a one-line error saying how to get it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        raise FlashMorphError("lm-eval is not installed; pip install lm-eval") from None
    return lm_eval


def task_manager(cfg: LMEvalConfig):
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=cfg.include_path, include_defaults=cfg.include_defaults)


def check_tasks(cfg: LMEvalConfig, manager=None):
    """Raise ConfigError for a task lm-eval does not know; returns the TaskManager it asked."""
    cfg.validate()
    manager = manager or task_manager(cfg)
    known = set(manager.all_tasks)
    for name in cfg.tasks:
        if name not in known:
            raise ConfigError(f"lm-eval task {name!r} is unknown to lm-eval; list known tasks with `lm-eval ls tasks`")
    return manager


@functools.cache
def adapter_class() -> type:
    """FlashMorphLM, built on first use so that importing this module never imports lm_eval."""
    require_lm_eval()
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM

    class FlashMorphLM(TemplateLM):
        """Scores (context, continuation) log-likelihoods with one forward per batch of right-padded requests;
        causal attention (softmax or linear) never lets padding on the right reach a real token."""

        def __init__(self, model: nn.Module, tokenizer, batch_size: int = 8, max_length: int | None = None,
                     show_progress: bool = True):
            super().__init__()
            self.model, self.tokenizer = model.eval(), tokenizer
            self.batch_size = batch_size
            config_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            self._max_length = max_length or config_length or DEFAULT_MAX_LENGTH
            self.show_progress = show_progress
            if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
                raise ConfigError("the tokenizer has neither bos_token nor eos_token; lm-eval needs one as a prefix")

        @property
        def device(self):
            return model_device(self.model)

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def eot_token_id(self) -> int:
            eos, bos = self.tokenizer.eos_token_id, self.tokenizer.bos_token_id
            return eos if eos is not None else bos

        @property
        def prefix_token_id(self) -> int:
            # an empty context is scored after BOS, as lm-eval's HF backend does
            return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            """None: the tokenizer's own default (Llama's adds BOS to every context, as lm-eval's HF backend
            does), except for a string that already starts with the BOS text."""
            if add_special_tokens is None:
                bos = self.tokenizer.bos_token
                add_special_tokens = not (bos and string.startswith(bos))
            return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

        def tok_decode(self, tokens, **kwargs) -> str:
            return self.tokenizer.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            """requests: ((context, continuation) or None, context_ids, continuation_ids) -> (logprob, is_greedy)."""
            scored = []  # (request index, input ids, number of continuation tokens, continuation ids)
            for index, (_, context_ids, continuation_ids) in enumerate(requests):
                whole = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1):]
                num_cont = min(len(continuation_ids), len(whole) - 1)
                scored.append((index, whole[:-1], num_cont, whole[len(whole) - num_cont:]))
            scored.sort(key=lambda item: -len(item[1]))  # similar lengths share a batch: less padding
            results: list = [None] * len(requests)
            bar = tqdm(total=len(scored), desc="lm-eval", disable=disable_tqdm or not self.show_progress)
            for start in range(0, len(scored), self.batch_size):
                chunk = scored[start : start + self.batch_size]
                for (index, *_), result in zip(chunk, self._score_batch(chunk), strict=True):
                    results[index] = result
                    pair = requests[index][0]
                    if pair is not None:
                        self.cache_hook.add_partial("loglikelihood", pair, result)
                bar.update(len(chunk))
            bar.close()
            return results

        @torch.no_grad()
        def _score_batch(self, chunk) -> list[tuple[float, bool]]:
            longest = max(len(ids) for _, ids, _, _ in chunk)
            input_ids = torch.zeros(len(chunk), longest, dtype=torch.long)  # right padding; any id serves
            for row, (_, ids, _, _) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            first = min(len(ids) - num_cont for _, ids, num_cont, _ in chunk)  # earliest scored logit position
            logits = last_logits(self.model, input_ids, longest - first)  # [batch, keep, vocab]
            offset = longest - logits.shape[1]
            out = []
            for row, (_, ids, num_cont, cont) in enumerate(chunk):
                end = len(ids) - offset
                step = logits[row, end - num_cont : end].float().log_softmax(-1)  # [num_cont, vocab]
                target = torch.tensor(cont, dtype=torch.long, device=step.device)
                logprob = float(step.gather(-1, target[:, None]).sum())
                out.append((logprob, bool((step.argmax(-1) == target).all())))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Sum of log-probs of each whole string, in max_length windows with one token of overlap (lm-eval's
            rolling scheme), the first token conditioned on the prefix token (BOS), which is itself not scored."""
            windows, owners = [], []
            for owner, (string,) in enumerate(req.args for req in requests):
                tokens = self.tok_encode(string, add_special_tokens=False)
                rolling = utils.get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                          max_seq_len=self.max_length, context_len=1)
                for context, continuation in map(utils.make_disjoint_window, rolling):
                    windows.append((None, context, continuation))
                    owners.append(owner)
            totals = [0.0] * len(requests)
            for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
                totals[owner] += logprob
            for req, total in zip(requests, totals, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            raise NotImplementedError(
                "flashmorph's lm-eval adapter scores log-likelihoods only; generate_until tasks are not supported, "
                "pick multiple-choice or perplexity tasks such as piqa, arc_easy, hellaswag, winogrande"
            )

    return FlashMorphLM


def make_lm(model: nn.Module, tokenizer, batch_size: int = 8, max_length: int | None = None,
            show_progress: bool = True):
    """`model` wrapped as an lm_eval LM (raises the pip hint if lm_eval is missing)."""
    return adapter_class()(model, tokenizer, batch_size=batch_size, max_length=max_length,
                           show_progress=show_progress)


def _is_data_error(err: BaseException) -> bool:
    return isinstance(err, ConnectionError) or type(err).__module__.split(".")[0] in _DATA_ERROR_MODULES


def evaluate_lm_eval(model: nn.Module, tokenizer, cfg: LMEvalConfig, manager=None, show_progress: bool = True) -> dict:
    """Run lm-eval tasks on `model`; returns {"tasks": {task: {metric: value}}, "samples": {...}, "config": {...}}."""
    lm_eval = require_lm_eval()
    manager = check_tasks(cfg, manager)
    lm = make_lm(model, tokenizer, cfg.batch_size, cfg.max_length, show_progress)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=cfg.bootstrap_iters)
    except Exception as err:
        if not _is_data_error(err):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FlashMorphError(
            f"lm-eval could not load the data of {cfg.tasks} ({reason}); download it into the HF datasets cache "
            "first, or point include_path at task YAMLs that read local files"
        ) from err
    tasks = {}
    for name, metrics in out["results"].items():
        # "acc,none" -> "acc": lm-eval suffixes each metric with its filter, "none" for these tasks
        tasks[name] = {key.removesuffix(",none"): value for key, value in metrics.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {
        "tasks": tasks,
        "samples": out.get("n-samples", {}),
        "lm_eval_version": lm_eval.__version__,
        "config": dataclasses.asdict(cfg),
    }
