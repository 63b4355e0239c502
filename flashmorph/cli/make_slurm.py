"""Write the SLURM batch script of one flashmorph stage from a recipe (fills launcher/slurm/stage.sbatch.template).

    python tools/make_slurm.py --config recipes/llama3_8b_gate_search.yaml --nodes 1 --gpus-per-node 8 \
        --partition gpu --account myproject --time 04:00:00 --override model.path=/models/Meta-Llama-3-8B \
        -o jobs/llama3_8b_gate_search.sbatch
    python tools/make_slurm.py --write-examples        # regenerate launcher/slurm/examples/

The stage (gate_search, distill, long_context) follows from the recipe's file name unless --stage is given.
Run it from the flashmorph checkout; the job runs from the directory it is submitted from.
"""

import argparse
import re
import shlex
import stat
import sys
from pathlib import Path

from flashmorph.cli._tool import ArgumentParser, fail
from flashmorph.errors import ConfigError, FlashMorphError

# the checkout: the template, the examples and the recipes the examples name live there, not in the package
ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "launcher" / "slurm" / "stage.sbatch.template"
EXAMPLES_DIR = ROOT / "launcher" / "slurm" / "examples"
STAGES = ("gate_search", "distill", "long_context")
# the job id spreads concurrent jobs that share a first node over ports 20000..39999
DEFAULT_MASTER_PORT = "$((20000 + SLURM_JOB_ID % 20000))"
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# file name -> generator arguments; `--write-examples` writes them, a test checks they are up to date
EXAMPLES = {
    f"llama3_{size}_{stage}_{nodes}x8.sbatch": ["--config", f"recipes/llama3_{size}_{stage}.yaml",
                                                "--nodes", str(nodes), "--gpus-per-node", "8", "--time", time]
    for size, nodes in (("8b", 1), ("70b", 8))
    for stage, time in (("gate_search", "08:00:00"), ("distill", "24:00:00"), ("long_context", "24:00:00"))
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Generate an sbatch script that runs one flashmorph stage with one torchrun per node.")
    parser.add_argument("--config", help="recipe YAML as the job sees it, e.g. recipes/llama3_70b_gate_search.yaml")
    parser.add_argument("--stage", choices=STAGES, help="stage to run (default: from the recipe's file name)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs, hence ranks, per node (default 8)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per node for the job (default 8 per GPU)")
    parser.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    parser.add_argument("--account", help="SLURM account to charge (default: yours)")
    parser.add_argument("--qos", help="SLURM quality of service, e.g. a preemptible one")
    parser.add_argument("--time", default="24:00:00", help="time limit per job, [D-]HH:MM:SS (default 24:00:00); "
                                                           "a longer run requeues itself")
    parser.add_argument("--job-name", help="job name (default: the recipe's file name); one run directory per name")
    parser.add_argument("--run-dir", help="run directory (default: runs/<job name>)")
    parser.add_argument("--log-dir", help="directory of the per-job logs <job name>-<job id>.out "
                                          "(default: <run dir>/slurm; it must exist before sbatch)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="recipe override passed to the stage (repeatable), e.g. model.path=/models/Llama-3-8B")
    parser.add_argument("--signal-lead", type=int, default=300,
                        help="seconds before the time limit at which the ranks are told to checkpoint and stop "
                             "(default 300; must cover one step plus one checkpoint)")
    parser.add_argument("--master-port", type=int, help="rendezvous port (default: 20000 + job id mod 20000)")
    parser.add_argument("--workdir", help="directory the job runs in: the flashmorph checkout "
                                          "(default: the directory sbatch is called from)")
    parser.add_argument("--venv", help="virtual environment to activate on every node")
    parser.add_argument("--setup", action="append", default=[], metavar="SHELL_LINE",
                        help="shell line run before the launch (repeatable), e.g. 'module load cuda/12.4'")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment (repeatable), e.g. NCCL_SOCKET_IFNAME=ib0")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="extra #SBATCH option (repeatable), e.g. --sbatch=--exclusive")
    parser.add_argument("-o", "--output", help="write the script here (default: stdout)")
    parser.add_argument("--write-examples", action="store_true", help="regenerate launcher/slurm/examples/ and exit")
    return parser


def shell_word(value: str) -> str:
    """`value` as one bash word that expands to exactly `value`: shlex.quote, or ANSI-C $'...' quoting when it holds
    a newline or another control character, so no value ever spans lines (a comment or directive it lands in stays
    one line)."""
    if not _CONTROL.search(value):
        return shlex.quote(value)
    escaped = "".join({"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch)
                      or (f"\\x{ord(ch):02x}" if _CONTROL.match(ch) else ch) for ch in value)
    return f"$'{escaped}'"


def parse_time(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds."""
    match = _TIME.match(text)
    if match is None:
        raise ConfigError(f"--time {text!r} is not a SLURM time; use [D-]HH:MM:SS, e.g. 24:00:00")
    days = int(match["days"] or 0)
    parts = [int(p) for p in (match["a"], match["b"], match["c"]) if p is not None]
    if match["days"] is not None:  # D-H, D-H:M, D-H:M:S
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, s = parts
    else:  # M or M:S
        h, (m, s) = 0, (parts + [0])[:2]
    return ((days * 24 + h) * 60 + m) * 60 + s


def infer_stage(config: str) -> str:
    name = Path(config).stem
    for stage in ("long_context", "distill", "gate_search"):  # long_context first: its recipes may mention distill
        if stage in name:
            return stage
    raise ConfigError(f"cannot tell the stage from --config {config}; pass --stage {'|'.join(STAGES)}")


def _recipe_path(config: str) -> Path:
    path = Path(config)
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        path = ROOT / path  # the examples name recipes relative to the checkout
    return path


def _load_recipe(stage: str, config: str, overrides: list[str]):
    """Parse the recipe with its stage's dataclasses: catches typos now, not after a day in the queue."""
    from flashmorph.config import load_recipe

    if stage == "gate_search":
        return load_recipe(_recipe_path(config), overrides)
    from flashmorph.config import DistillRecipe

    return load_recipe(_recipe_path(config), overrides, cls=DistillRecipe)


def _layout(recipe, world_size: int, gpus_per_node: int) -> str:
    from flashmorph.parallel.layout import layout_from_config

    layout = layout_from_config(recipe.parallel, world_size)  # ConfigError when TP x SP does not divide the world
    if gpus_per_node % layout.tensor:
        print(f"warning: tensor_parallel={layout.tensor} does not divide --gpus-per-node {gpus_per_node}: TP groups "
              "span nodes and talk over the network instead of NVLink", file=sys.stderr)
    return f"TP {layout.tensor} x SP {layout.sequence} x DP {layout.data}"


def _check(args) -> None:
    for name in ("nodes", "gpus_per_node", "signal_lead"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task {args.cpus_per_task} must be >= 1")
    limit = parse_time(args.time)
    if args.signal_lead >= limit:
        raise ConfigError(f"--signal-lead {args.signal_lead} s must be shorter than --time {args.time} ({limit} s); "
                          "lower it or raise the time limit")
    if not _JOB_NAME.match(args.job_name):
        raise ConfigError(f"--job-name {args.job_name!r} may hold only letters, digits, '.', '_' and '-'")
    for item in args.override:
        if item.split("=", 1)[0].strip() == "run.run_dir":
            raise ConfigError("set the run directory with --run-dir, not --override run.run_dir=...")
    for item in args.env:
        if "=" not in item:
            raise ConfigError(f"--env {item!r} must look like KEY=VALUE")
        key = item.split("=", 1)[0]
        if not _SHELL_NAME.match(key):
            raise ConfigError(f"--env {item!r}: {key!r} is not a shell variable name; use letters, digits and '_', "
                              "not starting with a digit")
    # #SBATCH directives cannot be quoted: a newline would start a line of shell, a space would cut the value
    for flag in ("partition", "account", "qos", "log_dir"):
        value = getattr(args, flag)
        if value is not None and (not value or re.search(r"[\s\x00-\x1f\x7f]", value)):
            raise ConfigError(f"--{flag.replace('_', '-')} {value!r} goes into an #SBATCH line, which cannot be "
                              "quoted; give it without spaces or control characters")
    for option in args.sbatch:
        if _CONTROL.search(option):
            raise ConfigError(f"--sbatch {option!r} holds a control character (a newline?); give one option per "
                              "--sbatch")
    if args.master_port is not None and not 1024 <= args.master_port <= 65535:
        raise ConfigError(f"--master-port {args.master_port} must lie in 1024..65535")


def _generator_command(args) -> str:
    """The command line that reproduces this script, defaults included where they matter."""
    words = ["python", "tools/make_slurm.py", "--config", args.config, "--stage", args.stage,
             "--nodes", str(args.nodes), "--gpus-per-node", str(args.gpus_per_node), "--time", args.time]
    for flag in ("partition", "account", "qos", "job_name", "run_dir", "log_dir", "cpus_per_task", "master_port",
                 "workdir", "venv"):
        if getattr(args, f"_{flag}_given", False):
            words += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.signal_lead != 300:
        words += ["--signal-lead", str(args.signal_lead)]
    for flag in ("override", "setup", "env", "sbatch"):
        for value in getattr(args, flag):
            words.append(f"--{flag}={value}" if flag == "sbatch" else f"--{flag}")
            if flag != "sbatch":
                words.append(value)
    if args.output:
        words += ["-o", args.output]
    return " ".join(shell_word(word) for word in words)


def resolve(argv: list[str]) -> argparse.Namespace:
    """Parsed arguments with every default filled in and checked; ConfigError on a bad parameter."""
    args = build_parser().parse_args(argv)
    if args.write_examples:
        return args
    if not args.config:
        raise ConfigError("--config is required: the recipe the job runs, e.g. recipes/llama3_8b_gate_search.yaml")
    for flag in ("partition", "account", "qos", "job_name", "run_dir", "log_dir", "cpus_per_task", "master_port",
                 "workdir", "venv"):
        setattr(args, f"_{flag}_given", getattr(args, flag) is not None)
    args.stage = args.stage or infer_stage(args.config)
    args.job_name = args.job_name or Path(args.config).stem
    args.run_dir = args.run_dir or f"runs/{args.job_name}"
    args.log_dir = args.log_dir or f"{args.run_dir}/slurm"
    _check(args)
    return args


def render(argv: list[str]) -> str:
    """The script for these generator arguments; ConfigError on a bad recipe or parameter."""
    args = resolve(argv)
    world_size = args.nodes * args.gpus_per_node
    recipe = _load_recipe(args.stage, args.config, [f"run.run_dir={args.run_dir}", *args.override])
    layout = _layout(recipe, world_size, args.gpus_per_node)
    cpus = args.cpus_per_task or 8 * args.gpus_per_node

    extra = [f"#SBATCH --{name}={getattr(args, name)}" for name in ("partition", "account", "qos")
             if getattr(args, name)]
    extra += [f"#SBATCH {option}" for option in args.sbatch]
    stage_args = [("--config", args.config), ("--override", f"run.run_dir={args.run_dir}")]
    stage_args += [("--override", item) for item in args.override]
    stage_args.append(("--no-progress",))  # a progress bar in a log file is one line per refresh
    setup = [f"source {shell_word(str(Path(args.venv) / 'bin' / 'activate'))}"] if args.venv else []
    setup += args.setup
    env = [f"export {item.split('=', 1)[0]}={shell_word(item.split('=', 1)[1])}" for item in args.env]

    values = {
        "JOB_NAME": args.job_name, "STAGE": args.stage, "NODES": str(args.nodes),
        "GPUS_PER_NODE": str(args.gpus_per_node), "WORLD_SIZE": str(world_size), "LAYOUT": layout,
        "GENERATOR_COMMAND": _generator_command(args), "LOG_DIR": args.log_dir,
        "LOG_DIR_WORD": shell_word(args.log_dir), "SCRIPT_NAME": shell_word(args.output or f"{args.job_name}.sbatch"), "SIGNAL_LEAD": str(args.signal_lead),
        "CPUS_PER_TASK": str(cpus), "TIME": args.time, "EXTRA_SBATCH": "".join(line + "\n" for line in extra),
        "STAGE_ARGS": "\n".join("    " + " ".join(shell_word(word) for word in pair) for pair in stage_args),
        "WORKDIR": shell_word(args.workdir) if args.workdir else '"$SLURM_SUBMIT_DIR"',
        "SETUP": "\n".join(setup), "ENV": "\n".join(env),
        "MASTER_PORT": str(args.master_port) if args.master_port else DEFAULT_MASTER_PORT,
        "OMP_THREADS": str(max(1, cpus // args.gpus_per_node)),
    }
    if not TEMPLATE.is_file():  # a non-editable install has the package but not the checkout the job runs in
        raise ConfigError(f"{TEMPLATE} is missing; run the generator from the flashmorph checkout (python "
                          "tools/make_slurm.py, or flashmorph-make-slurm after pip install -e .)")
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.search(r"\{\{[A-Z_]+\}\}", text)
    if leftover:
        raise FlashMorphError(f"{TEMPLATE} has a placeholder {leftover.group(0)} the generator does not fill; "
                              "add it to flashmorph/cli/make_slurm.py")
    return re.sub(r"\n{3,}", "\n\n", text)  # empty SETUP/ENV leave no holes


def write_script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def example_text(name: str) -> str:
    return render([*EXAMPLES[name], "-o", f"launcher/slurm/examples/{name}"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = resolve(argv)
        if args.write_examples:
            for name in EXAMPLES:
                write_script(EXAMPLES_DIR / name, example_text(name))
                print(f"wrote {EXAMPLES_DIR / name}")
            return 0
        text = render(argv)
    except FlashMorphError as err:
        return fail(err)
    if not args.output:
        sys.stdout.write(text)
        return 0
    write_script(Path(args.output), text)
    print(f"wrote {args.output}; submit it from the flashmorph checkout:\n"
          f"  mkdir -p {shlex.quote(args.log_dir)} && sbatch {shlex.quote(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
