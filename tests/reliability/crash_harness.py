"""Seeded crash harness: run a stage's launcher as users do, SIGKILL it (at a seeded moment or at a named point of a
checkpoint write, via FLASHMORPH_FAULT_KILL_AT), resume, repeat; the outputs must equal an uninterrupted run's.

CI runs a few trials (tests/reliability/test_crash_harness.py); a longer campaign runs this file directly:

    OMP_NUM_THREADS=1 python tests/reliability/crash_harness.py --trials 20 --minutes 60 --out <dir>
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAULT_ENV = "FLASHMORPH_FAULT_KILL_AT"  # flashmorph/io/atomic.py reads it
DEFAULT_SEED = 0
TRIALS_ENV = "FLASHMORPH_CRASH_TRIALS"  # trials per stage for a long run of the pytest suite
CHECKPOINT_SITES = ("staging", "sealing", "manifest", "sealed", "prune")  # every save passes these (prune: keep_last)
FILE_SITES = ("file_tmp", "file_renamed")  # single-file writes: outputs, summary, config.yaml, teacher checkpoints
LAUNCH_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage as the harness drives it: its launcher command, and what must come out bit for bit."""

    name: str
    launcher: str  # under launcher/
    recipe: str  # under recipes/
    overrides: tuple[str, ...]  # everything but the run directory
    dir_key: str  # the override that names the run (or output) directory
    outputs: tuple[str, ...]  # files, or directories compared file by file, relative to the run dir
    summary: str  # the JSON written last: compared without the keys below
    summary_skip: tuple[str, ...]  # describe this process (wall time, what was resumed), not the result
    resume_flag: tuple[str, ...] = ("--resume",)  # the teacher continues on its own
    sites: dict = dataclasses.field(default_factory=dict)  # fault site -> hits in an uninterrupted run

    def command(self, run_dir: Path, resume: bool) -> list[str]:
        argv = [sys.executable, str(ROOT / "launcher" / self.launcher), "--config", str(ROOT / "recipes" / self.recipe),
                "--no-progress"]
        for item in (*self.overrides, f"{self.dir_key}={run_dir}"):
            argv += ["--override", item]
        return argv + list(self.resume_flag if resume else ())


def build_inputs(root: Path) -> dict[str, Path]:
    """The tiny models every stage reads: a 2-layer model for gate search, a 4-layer teacher with a layout."""
    from flashmorph.model.tiny import build_tiny_model, tiny_config

    paths = {"gate_model": root / "gate_model", "distill_model": root / "distill_model"}
    if not (paths["gate_model"] / "config.json").is_file():
        build_tiny_model(tiny_config("llama", num_layers=2), seed=7).save_pretrained(paths["gate_model"])
    if not (paths["distill_model"] / "hybrid.json").is_file():
        config = tiny_config("llama", num_layers=4)
        config.initializer_range = 0.3  # as in tests/stages/test_distill.py: a KL that moves
        build_tiny_model(config, seed=3).save_pretrained(paths["distill_model"])
        (paths["distill_model"] / "hybrid.json").write_text(json.dumps({"layer_types": ["full", "linear", "linear",
                                                                                         "full"]}))
    return paths


def stages(inputs: dict[str, Path], distill_run: Path | None = None) -> dict[str, Stage]:
    """The tiniest settings that still save several checkpoints and prune some; `distill_run` (a finished distill
    run) enables long_context, which continues from it."""
    skip = ("resumed", "train_seconds", "skipped_nonfinite_steps")

    def ckpt_sites(saves: int, pruned: int, files: int) -> dict[str, int]:
        return {**{site: saves for site in CHECKPOINT_SITES}, "prune": pruned, **{site: files for site in FILE_SITES}}

    gate = inputs["gate_model"]
    model = inputs["distill_model"]
    distill_common = (f"model.path={model}", f"student.layout={model / 'hybrid.json'}", "distill.micro_batch_size=2",
                      "distill.warmup_steps=0", "data.seq_len=32", "data.num_pairs=4", "distill.token_chunk=24",
                      "distill.vocab_chunk=40", "text.weight=0", "distill.save_every=1", "distill.keep_last=2",
                      "distill.lr=0.01")
    found = {
        "teacher": Stage(
            "teacher", "teacher.py", "experiments/proxy_teacher.yaml",
            ("teacher.device=cpu", "teacher.num_layers=2", "teacher.hidden_size=32", "teacher.num_heads=2",
             "teacher.num_kv_heads=1", "teacher.vocab_size=64", "teacher.batch_size=8", "teacher.eval_samples=16",
             "teacher.warmup_steps=2", "teacher.checkpoint_every=2", "teacher.curriculum=[2,3]",
             "teacher.advance_accuracy=1.0", "teacher.max_steps_per_stage=4", "teacher.require_complete=false"),
            "out_dir", ("model.safetensors", "config.json"), "teacher_report.json", skip, resume_flag=(),
            # 4 saves of 3 files each (model, optimizer, progress), then the report; keep_last=1 prunes 3
            sites=ckpt_sites(4, 3, 13)),
        "gate_search": Stage(
            "gate_search", "gate_search.py", "embedded.yaml",
            (f"model.path={gate}", "search.steps=4", "search.save_every=1", "search.keep_last=2",
             "search.micro_batch_size=2", "data.seq_len=34"),
            "run.run_dir", ("gates.safetensors",), "summary.json", skip,
            # 4 saves, 2 pruned; config.yaml, versions.json, gates.safetensors, summary.json
            sites=ckpt_sites(4, 2, 4)),
        "distill": Stage(
            "distill", "distill.py", "embedded_distill.yaml", (*distill_common, "distill.steps=4"),
            "run.run_dir", ("adapter", "student"), "summary.json", (*skip, "first_step_run", "kl_per_token"),
            sites=ckpt_sites(4, 2, 4)),
    }
    if distill_run is not None:
        found["long_context"] = Stage(
            "long_context", "long_context.py", "embedded_long_context.yaml",
            (*distill_common, f"student.init_from={distill_run}",
             "distill.length_schedule=[{seq_len: 32, steps: 2}, {seq_len: 48, steps: 2}]"),
            "run.run_dir", ("adapter", "student"), "summary.json", (*skip, "first_step_run", "kl_per_token"),
            sites=ckpt_sites(4, 2, 4))
    return found


# ----------------------------------------------------------------------------------------------------------
# One launch, one trial


@dataclasses.dataclass
class Launch:
    resume: bool
    kill: str | None  # "site:n", "time:seconds" or None (run to the end)
    returncode: int
    seconds: float
    killed: bool  # died by SIGKILL (the injected fault happened)


def launch(stage: Stage, run_dir: Path, log: Path, kill: str | None = None) -> Launch:
    """Start the launcher (with --resume when run_dir exists, as a requeued job would); kill it as `kill` says."""
    resume = run_dir.exists()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    env.pop(FAULT_ENV, None)
    delay = None
    if kill is not None and kill.startswith("time:"):
        delay = float(kill.split(":")[1])
    elif kill is not None:
        env[FAULT_ENV] = kill
    started = time.monotonic()
    with open(log, "a") as out:
        out.write(f"\n$ {FAULT_ENV}={env.get(FAULT_ENV, '')} {' '.join(stage.command(run_dir, resume))}\n")
        out.flush()
        proc = subprocess.Popen(stage.command(run_dir, resume), env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=delay if delay is not None else LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            if delay is None:
                proc.kill()
                proc.wait()
                raise AssertionError(f"{stage.name}: launch ran past {LAUNCH_TIMEOUT_S} s; see {log}") from None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    return Launch(resume, kill, proc.returncode, round(time.monotonic() - started, 2),
                  proc.returncode == -signal.SIGKILL)


def check_resumable(stage: Stage, run_dir: Path) -> None:
    """What a kill may leave: no run dir, or one that --resume accepts, whose every sealed checkpoint is intact."""
    from flashmorph.checkpoint.atomic import list_checkpoints, verify
    from flashmorph.run_dir import check_resume

    if not run_dir.exists():
        return
    if stage.resume_flag:
        check_resume(run_dir, True)  # raises the one-line refusal the launcher would print
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        verify(ckpt, deep=True)  # a SIGKILL must never leave a damaged step_N: sealing is a rename


PROVENANCE = "versions.json"  # package versions and the checkout's git commit: describe the code, not the result


def _canonical(name: str, data: bytes, run_dir: Path):
    """Bytes, except JSON: parsed, with the run directory's own path as a placeholder and a manifest's provenance
    entry dropped."""
    if not name.endswith(".json"):
        return data
    parsed = json.loads(data.decode().replace(str(run_dir), "<run_dir>"))
    if name == "manifest.json":
        parsed["files"] = [f for f in parsed["files"] if f["path"] != PROVENANCE]
    return parsed


def outputs(stage: Stage, run_dir: Path) -> dict:
    """Every output file (`_canonical`), by path relative to run_dir."""
    found = {}
    for rel in stage.outputs:
        path = run_dir / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in (f for f in files if f.name != PROVENANCE):
            found[file.relative_to(run_dir).as_posix()] = (_canonical(file.name, file.read_bytes(), run_dir)
                                                           if file.is_file() else "<missing>")
    return found


def summary(stage: Stage, run_dir: Path) -> dict:
    data = _canonical(stage.summary, (run_dir / stage.summary).read_bytes(), run_dir)
    return {k: v for k, v in data.items() if k not in stage.summary_skip}


def compare(stage: Stage, reference: Path, run_dir: Path) -> list[str]:
    """The differences from the uninterrupted run (empty: bit for bit the same)."""
    problems = []
    expected, got = outputs(stage, reference), outputs(stage, run_dir)
    for rel in sorted(expected.keys() | got.keys()):
        if expected.get(rel) != got.get(rel):
            problems.append(f"{rel} differs from the uninterrupted run")
    if summary(stage, reference) != summary(stage, run_dir):
        problems.append(f"{stage.summary} differs: {summary(stage, reference)} != {summary(stage, run_dir)}")
    if "kl_per_token" in stage.summary_skip:
        # kl_per_token holds the steps the last process ran only: their last KL must match, if it ran any
        got = json.loads((run_dir / stage.summary).read_text())["kl_per_token"]["last"]
        want = json.loads((reference / stage.summary).read_text())["kl_per_token"]["last"]
        if got is not None and got != want:
            problems.append(f"last KL per token {got} != {want} of the uninterrupted run")
    return problems


def plan_kills(stage: Stage, rng: random.Random, reference_seconds: float, max_kills: int,
               timed: float = 0.5) -> list[str]:
    """1..max_kills kills: a share `timed` at a seeded time, the others at a named point of a write (a seeded site
    and hit: a timed kill rarely lands inside a save)."""
    kills = []
    for _ in range(rng.randint(1, max_kills)):
        if rng.random() >= timed:
            site = rng.choice(sorted(stage.sites))
            kills.append(f"{site}:{rng.randint(1, stage.sites[site])}")
        else:
            kills.append(f"time:{rng.uniform(0.5, reference_seconds):.2f}")
    return kills


def run_trial(stage: Stage, reference, workdir: Path, kills: list[str]) -> dict:
    """Kill the stage as `kills` says, check the directory after each kill, resume to the end, compare with
    `reference` (the uninterrupted run dir, or a future of `reference_run` that runs meanwhile)."""
    run_dir = workdir / "run"
    log = workdir / "launches.log"
    workdir.mkdir(parents=True, exist_ok=True)
    launches, problems = [], []
    for kill in kills:
        done = launch(stage, run_dir, log, kill)
        launches.append(done)
        if not done.killed and done.returncode != 0:
            problems.append(f"launch with kill {kill} exited {done.returncode}; see {log}")
            break
        try:
            check_resumable(stage, run_dir)
        except Exception as err:  # noqa: BLE001 - any refusal is the finding to report
            problems.append(f"after kill {kill}: {err}")
            break
    if not problems:
        final = launch(stage, run_dir, log)
        launches.append(final)
        if final.returncode != 0:
            problems.append(f"the resumed run exited {final.returncode}; see {log}")
        else:
            reference = reference if isinstance(reference, Path) else reference.result()[0]
            problems += compare(stage, reference, run_dir)
            damaged = (json.loads((run_dir / stage.summary).read_text()).get("resumed") or {}).get("damaged_skipped")
            if damaged:
                problems.append(f"resume skipped damaged checkpoints: {damaged}")
    return {"stage": stage.name, "kills": kills, "injected": sum(la.killed for la in launches),
            "launches": [dataclasses.asdict(la) for la in launches], "problems": problems}


def reference_run(stage: Stage, workdir: Path) -> tuple[Path, float]:
    """The uninterrupted run: its directory and wall time (a finished one in workdir is reused)."""
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir, timing = workdir / "run", workdir / "seconds.txt"
    if (run_dir / stage.summary).is_file() and timing.is_file():
        return run_dir, float(timing.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    done = launch(stage, run_dir, workdir / "launches.log")
    assert done.returncode == 0, f"{stage.name}: the reference run exited {done.returncode}; see {workdir}"
    timing.write_text(str(done.seconds))
    return run_dir, done.seconds


# ----------------------------------------------------------------------------------------------------------
# A campaign


def _figures(trials: list[dict], seconds: float) -> dict:
    landed = [k.split(":")[0] for t in trials for k, la in zip(t["kills"], t["launches"]) if la["killed"]]
    return {"reference_seconds": seconds, "trials": len(trials), "launches": sum(len(t["launches"]) for t in trials),
            "faults_injected": len(landed), "kills_landed": {site: landed.count(site) for site in sorted(set(landed))},
            "survived": sum(not t["problems"] for t in trials), "failed": [t for t in trials if t["problems"]]}


def campaign(out: Path, names: list[str], trials: int, seed: int, max_kills: int, deadline: float) -> dict:
    """Reference runs, then trials round-robin over the stages until `trials` each or the monotonic `deadline`;
    results.json is rewritten after every trial, so a campaign cut short still has its figures."""
    started = time.monotonic()
    inputs = build_inputs(out / "inputs")
    references, found = {}, {}
    for name in names:
        distill_run = references.get("distill", (None,))[0]
        found[name] = stages(inputs, distill_run)[name]
        references[name] = reference_run(found[name], out / name / "reference")
    rngs = {name: random.Random(f"{seed}:{name}") for name in names}
    done: dict[str, list[dict]] = {name: [] for name in names}
    results = {"seed": seed, "max_kills": max_kills, "stages": {}}
    for trial in range(trials):
        for name in names:
            if time.monotonic() > deadline:
                break
            reference, seconds = references[name]
            kills = plan_kills(found[name], rngs[name], max(seconds, 5.0), max_kills)
            workdir = out / name / f"trial_{trial}"
            result = run_trial(found[name], reference, workdir, kills)
            done[name].append(result)
            print(json.dumps(result), flush=True)
            if not result["problems"]:
                shutil.rmtree(workdir)
            results["stages"] = {n: _figures(done[n], references[n][1]) for n in names}
            results["wall_seconds"] = round(time.monotonic() - started, 1)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=int(os.environ.get(TRIALS_ENV, "3")), help="trials per stage")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--max-kills", type=int, default=2, help="kills per trial before the run may finish")
    parser.add_argument("--minutes", type=float, default=None, help="start no trial after this many minutes")
    parser.add_argument("--stages", default="teacher,gate_search,distill,long_context")
    parser.add_argument("--out", type=Path, required=True, help="work directory (trials that pass are deleted)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + (60 * args.minutes if args.minutes else float("inf"))
    results = campaign(args.out, args.stages.split(","), args.trials, args.seed, args.max_kills, deadline)
    for name, r in results["stages"].items():
        print(f"{name}: {r['trials']} trials, {r['launches']} launches, {r['faults_injected']} kills "
              f"({', '.join(f'{k} {v}' for k, v in r['kills_landed'].items())}), {r['survived']} survived")
    print(f"wall time {results.get('wall_seconds')} s")
    return 0 if all(not r["failed"] for r in results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
