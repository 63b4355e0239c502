"""Load DeepSpeed's checkpoint files without running code from them.

DeepSpeed reads its `*.pt` state files with `torch.load(weights_only=False)`, i.e. plain pickle: a run directory
written by someone else could execute code on `--resume` or reshard. Inside `weights_only_loads()` every torch.load
is forced to weights_only=True (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, read at each call), so only tensors,
containers and the few DeepSpeed types on the allow-list below are unpickled; anything else raises before it runs.
"""

import contextlib
import os
import pickle
import re
from pathlib import Path

from flashmorph.errors import CheckpointError

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # would make torch refuse both switches at once; off inside the block


def deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19 pickles into ZeRO checkpoints (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on fp32 and bf16 runs): plain data, no code on load.

    `getattr` too: some Python versions (3.11.2, for one) pickle an int-valued Enum member such as ZeroStageEnum.weights
    as getattr(ZeroStageEnum, "weights"). torch's weights-only unpickler still calls only allow-listed callables, so
    getattr can only fetch an attribute of an allow-listed type; it cannot call what it fetched."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, getattr]


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside the block (DeepSpeed's included) unpickles tensors and allow-listed types only."""
    import torch

    saved = {name: os.environ.get(name) for name in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NO, None)
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_refused_pickle(err: BaseException) -> bool:
    """The error torch raises when a weights-only load meets a type it will not unpickle."""
    return isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err)


def refused_pickle_error(err: BaseException, where) -> CheckpointError:
    """One line for a checkpoint file that asks to run code (or to build a type outside the allow-list)."""
    match = re.search(r"GLOBAL (\S+)", str(err))
    return _refusal(where, match.group(1) if match else type(err).__name__)


def _refusal(where, what: str) -> CheckpointError:
    return CheckpointError(f"{where} holds a pickle that asks for {what}, which is not plain tensor data; it was not "
                           "loaded, since that could run code: resume only from checkpoints you wrote, or delete it",
                           file=str(where))


def check_pickle_file(path: str | os.PathLike) -> None:
    """Scan one torch file's pickle without unpickling it: a global outside torch's safe set and the DeepSpeed
    allow-list (e.g. builtins.exec, os.system) is refused by name."""
    import torch

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as err:  # not a torch zip, truncated, ...: torch raises several types
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"corrupted or truncated DeepSpeed file {path} ({reason}); re-create the checkpoint "
                                  "or restore the file", file=str(path)) from None
    if unsafe:
        raise _refusal(path, unsafe[0])


def check_pickles(directory: str | os.PathLike) -> None:
    """`check_pickle_file` for every `*.pt` file under `directory`, before any rank loads anything."""
    for path in sorted(Path(directory).rglob("*.pt")):
        check_pickle_file(path)
