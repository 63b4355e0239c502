"""tools/reshard.py: bad input answers with one `error: ...` line and exit code 2 before any heavy work."""

import pytest
from reshard_helpers import assert_bit_exact, load_hf_dir, save_tiny

from flashmorph.cli import reshard as reshard_tool


def run(argv, capsys):
    code = reshard_tool.main([str(arg) for arg in argv])
    return code, capsys.readouterr()


@pytest.fixture
def hf_dir(tmp_path):
    save_tiny(tmp_path / "hf", "llama", num_heads=4, num_kv_heads=2)
    return tmp_path / "hf"


def test_hf_to_tp_and_back(tmp_path, hf_dir, capsys):
    code, out = run(["--from", "hf", "--to", "tp", "--src", hf_dir, "--dst", tmp_path / "tp", "--tp", 2,
                     "--no-progress"], capsys)
    assert code == 0 and "wrote tp checkpoint" in out.out
    code, _ = run(["--from", "tp", "--to", "hf", "--src", tmp_path / "tp", "--dst", tmp_path / "back"], capsys)
    assert code == 0
    assert_bit_exact(load_hf_dir(tmp_path / "back"), load_hf_dir(hf_dir))


@pytest.mark.parametrize("extra, message", [
    (["--to", "tp", "--tp", "3"], "--tp=3 does not divide the model's num_heads=4"),
    (["--to", "tp", "--tp", "4"], "--tp=4 exceeds the model's num_kv_heads=2"),
    (["--to", "tp"], "--to tp needs --tp N"),
    (["--to", "hf", "--tp", "2"], "--tp only applies to --to tp"),
    (["--to", "zero3", "--dp", "0"], "--dp must be an int >= 1"),
    (["--to", "hf", "--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size"),
])
def test_bad_request_is_one_line_exit_2(tmp_path, hf_dir, capsys, extra, message):
    code, out = run(["--from", "hf", "--src", hf_dir, "--dst", tmp_path / "out", *extra], capsys)
    assert code == 2 and out.err.startswith("error: ") and message in out.err
    assert out.err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_missing_inputs_and_occupied_dst(tmp_path, hf_dir, capsys):
    code, out = run(["--from", "hf", "--to", "tp", "--tp", 2, "--src", tmp_path / "nope", "--dst", tmp_path / "o"],
                    capsys)
    assert code == 2 and "is not a directory" in out.err
    code, out = run(["--from", "zero3", "--to", "hf", "--src", hf_dir, "--dst", tmp_path / "o"], capsys)
    assert code == 2 and "tag directories with *_model_states.pt: none" in out.err
    (hf_dir / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    code, out = run(["--from", "hf", "--to", "tp", "--tp", 2, "--src", hf_dir, "--dst", tmp_path / "o"], capsys)
    assert code == 2 and "holds neither model.safetensors nor model.safetensors.index.json" in out.err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    code, out = run(["--from", "tp", "--to", "hf", "--src", hf_dir, "--dst", tmp_path / "busy"], capsys)
    assert code == 2 and "pass --force to replace it" in out.err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        reshard_tool.parse_args(["--from", "fsdp", "--to", "hf", "--src", "a", "--dst", "b"])
    assert info.value.code == 2 and capsys.readouterr().err.startswith("error: argument --from")
