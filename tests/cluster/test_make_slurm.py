"""tools/make_slurm.py: valid bash for every stage, examples in sync with the generator, one-line errors."""

import subprocess

import pytest

from flashmorph.cli import make_slurm


@pytest.mark.parametrize("name", sorted(make_slurm.EXAMPLES))
def test_examples_are_what_the_generator_writes(name):
    path = make_slurm.EXAMPLES_DIR / name
    assert path.read_text() == make_slurm.example_text(name), (
        f"{path} is stale; regenerate with: python tools/make_slurm.py --write-examples")


@pytest.mark.parametrize("name", sorted(make_slurm.EXAMPLES))
def test_examples_are_valid_bash(name):
    subprocess.run(["bash", "-n", str(make_slurm.EXAMPLES_DIR / name)], check=True)


def test_every_stage_and_option_renders_valid_bash(tmp_path):
    for stage in make_slurm.STAGES:
        recipe = "recipes/embedded.yaml" if stage == "gate_search" else f"recipes/embedded_{stage}.yaml"
        text = make_slurm.render([
            "--config", recipe, "--stage", stage, "--nodes", "3", "--gpus-per-node", "4", "--partition", "gpu",
            "--account", "proj", "--qos", "preempt", "--time", "2-00:00:00", "--master-port", "29555",
            "--workdir", "/shared/flash morph", "--venv", "/shared/venv", "--setup", "module load cuda/12.4",
            "--env", "NCCL_SOCKET_IFNAME=ib0", "--sbatch=--exclusive", "--override", "data.tasks={mqar: 1.0}",
        ])
        path = tmp_path / f"{stage}.sbatch"
        path.write_text(text)
        subprocess.run(["bash", "-n", str(path)], check=True)
        for line in ("#SBATCH --nodes=3", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                     "#SBATCH --account=proj", "#SBATCH --qos=preempt", "#SBATCH --time=2-00:00:00",
                     "#SBATCH --exclusive", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                     "#SBATCH --open-mode=append",
                     "cd '/shared/flash morph'", "source /shared/venv/bin/activate", "module load cuda/12.4",
                     "export NCCL_SOCKET_IFNAME=ib0", "export MASTER_PORT=${MASTER_PORT:-29555}",
                     "    --override 'data.tasks={mqar: 1.0}'"):
            assert line in text.splitlines(), (stage, line)
        assert f"launcher/$STAGE.py" in text and f"STAGE={stage}" in text
        assert "{{" not in text


def test_defaults_follow_the_recipe_name():
    text = make_slurm.render(["--config", "recipes/llama3_8b_gate_search.yaml"])
    assert "STAGE=gate_search" in text and "#SBATCH --job-name=llama3_8b_gate_search" in text
    assert "    --override run.run_dir=runs/llama3_8b_gate_search" in text.splitlines()
    assert "#SBATCH --output=runs/llama3_8b_gate_search/slurm/%x-%j.out" in text.splitlines()
    assert "8 ranks (TP 1 x SP 1 x DP 8)" in text.splitlines()[1]


@pytest.mark.parametrize("argv, message", [
    (["--config", "recipes/embedded.yaml"], "cannot tell the stage"),
    (["--config", "recipes/llama3_8b_gate_search.yaml", "--time", "00:04:00"], "--signal-lead 300 s must be shorter"),
    (["--config", "recipes/llama3_8b_gate_search.yaml", "--time", "tomorrow"], "is not a SLURM time"),
    (["--config", "recipes/llama3_8b_gate_search.yaml", "--nodes", "0"], "--nodes 0 must be >= 1"),
    (["--config", "recipes/llama3_8b_gate_search.yaml", "--override", "run.run_dir=x"], "with --run-dir"),
    (["--config", "recipes/llama3_8b_gate_search.yaml", "--override", "search.stepz=3"], "unknown field search.stepz"),
    (["--config", "recipes/llama3_8b_gate_search.yaml", "--job-name", "a b"], "--job-name"),
    (["--config", "recipes/llama3_8b_gate_search.yaml", "--gpus-per-node", "3", "--override",
      "parallel.tensor_parallel=2"], "not divisible by parallel.tensor_parallel=2"),
])
def test_bad_parameters_are_one_line_errors(argv, message, capsys):
    assert make_slurm.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("30:15", 1815), ("04:00:00", 14400),
                                           ("1-00", 86400), ("1-02:03", 93780), ("2-00:00:10", 172810)])
def test_slurm_time_formats(text, seconds):
    assert make_slurm.parse_time(text) == seconds


def test_output_file_is_executable_and_says_how_to_submit(tmp_path, capsys):
    out = tmp_path / "jobs" / "gs.sbatch"
    assert make_slurm.main(["--config", "recipes/llama3_8b_gate_search.yaml", "-o", str(out)]) == 0
    assert out.stat().st_mode & 0o111
    assert "mkdir -p runs/llama3_8b_gate_search/slurm && sbatch" in capsys.readouterr().out


# a value a user might paste, or an attacker might plant: command substitutions, both quotes, spaces, a newline
# that would end a comment line, a tab, a backslash and a dollar
HOSTILE = "a b \"dq\" 'sq' $(touch {marker}) `touch {marker}`; touch {marker}\ntouch {marker} \t\\ $HOME end"


def test_hostile_values_pass_through_the_script_unchanged_and_never_run(tmp_path):
    import os

    from slurm_helpers import fake_slurm_env

    marker = tmp_path / "code_ran"
    value = HOSTILE.format(marker=marker)
    run_dir = f"{tmp_path}/run $(touch {marker}) 'q'"
    text = make_slurm.render(["--config", "recipes/llama3_8b_gate_search.yaml", "--nodes", "1", "--gpus-per-node",
                              "1", "--time", "01:00:00", "--run-dir", run_dir, "--log-dir", str(tmp_path),
                              "--env", f"HOSTILE_VALUE={value}", "--setup", "true"])
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert all(line.startswith("#") for line in text.splitlines()[:12])  # the header comment kept every line
    env = fake_slurm_env(tmp_path, nodes=1)
    torchrun = tmp_path / "fake_slurm_bin" / "torchrun"  # records what the rank would get
    torchrun.write_text('#!/bin/bash\nprintf %s "$HOSTILE_VALUE" > "$FAKE_OUT/value"\n'
                        'printf "%s\\n" "$@" > "$FAKE_OUT/args"\n')
    torchrun.chmod(0o755)
    env["FAKE_OUT"] = str(tmp_path)
    env.pop("HOSTILE_VALUE", None)
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "value").read_text() == value
    assert f"run.run_dir={run_dir}" in (tmp_path / "args").read_text().splitlines()
    assert not marker.exists() and os.path.exists(tmp_path / "args")


@pytest.mark.parametrize("argv, message", [
    (["--env", "1KEY=v"], "'1KEY' is not a shell variable name"),
    (["--env", "A-B=v"], "'A-B' is not a shell variable name"),
    (["--env", "$(touch x)=v"], "is not a shell variable name"),
    (["--env", "NOVALUE"], "must look like KEY=VALUE"),
    (["--partition", "gpu\ntouch x"], "--partition"),
    (["--account", "a b"], "--account"),
    (["--qos", ""], "--qos"),
    (["--log-dir", "logs\nrm -rf x"], "--log-dir"),
    (["--sbatch", "--exclusive\ntouch x"], "--sbatch"),
])
def test_values_that_cannot_be_quoted_safely_are_refused(argv, message, capsys, tmp_path):
    out = tmp_path / "job.sbatch"
    assert make_slurm.main(["--config", "recipes/llama3_8b_gate_search.yaml", *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_missing_template_is_one_line_naming_the_checkout(monkeypatch, capsys, tmp_path):
    """flashmorph-make-slurm from a non-editable install has no launcher/slurm/ next to it: one line, exit 2."""
    monkeypatch.setattr(make_slurm, "TEMPLATE", tmp_path / "stage.sbatch.template")
    assert make_slurm.main(["--config", "recipes/llama3_8b_gate_search.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'stage.sbatch.template'} is missing") and err.count("\n") == 1
    assert "tools/make_slurm.py" in err and "pip install -e ." in err
