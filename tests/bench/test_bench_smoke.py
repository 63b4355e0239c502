"""The benchmark scripts in their CPU smoke mode (tiny shape, seconds each), so they cannot rot: each writes its JSON
(environment, rows, ratios) and prints one table line per ratio; plus the helpers the later benchmarks will use."""

import importlib
import json

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads on a busy 2-core box; the setting comes back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_smoke(name: str, tmp_path, capsys, *extra: str) -> dict:
    """Run bench.<name> --smoke in-process; check its results file and table; return the file's contents."""
    module = importlib.import_module(f"bench.{name}")
    ratios = module.main(["--smoke", "--out", str(tmp_path), *extra])
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["complete"] is True and data["benchmark"] == name
    env = data["environment"]
    assert env["device"].startswith("cpu") and env["date"]
    assert env["command"].startswith(f"python -m bench.{name} --smoke --out ")
    assert env["versions"]["torch"] != "not installed" and "transformers" in env["versions"]
    table = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]
    assert len(table) == len(data["ratios"]) == len(ratios) > 0
    return data


def test_gate_memory_runs_both_steps(tmp_path, capsys):
    data = run_smoke("gate_memory", tmp_path, capsys)
    assert [row["length"] for row in data["rows"]] == [64, 128]
    # torch keeps no allocator statistics on CPU: the ratio must say "not measured", never a made-up number
    assert all(row["gate_search_peak_bytes"] is None for row in data["rows"])
    assert all(r["value"] is None and r["met"] == "-" for r in data["ratios"])


def test_branch_cost_divides_the_mixed_step_by_both_single_branch_steps(tmp_path, capsys):
    data = run_smoke("branch_cost", tmp_path, capsys)
    for row, line in zip(data["rows"], data["ratios"]):
        assert min(row["mixed_step_s"], row["softmax_step_s"], row["linear_step_s"]) > 0
        expected = row["mixed_step_s"] / (row["softmax_step_s"] + row["linear_step_s"])
        assert line["value"] == pytest.approx(expected) and line["target"] == "<= 1.10"


def test_hybrid_inference_cache_bytes_are_kv_for_full_layers_and_one_state_per_linear_layer(tmp_path, capsys):
    data = run_smoke("hybrid_inference", tmp_path, capsys)
    assert data["layouts"]["hybrid"] == ["full", "linear", "linear", "linear"]  # 1/4 of the tiny shape's 4 layers
    kv_heads, heads, head_dim, fp32 = 2, 4, 16, 4  # the tiny shape, fp32 on CPU
    for row in data["rows"]:
        batch, length = row["batch"], row["length"]
        kv_layer = 2 * batch * kv_heads * length * head_dim * fp32  # K and V: [B, Hkv, T, D]
        state = batch * heads * head_dim * head_dim * fp32  # [B, H, D, D]
        assert row["softmax_cache_bytes"] == 4 * kv_layer
        assert row["hybrid_cache_bytes"] == kv_layer + 3 * state
    kinds = [row["kind"] for row in data["rows"]]
    assert kinds == ["decode", "prefill", "prefill"]
    assert data["rows"][0]["softmax_tokens_per_s"] > 0 and data["rows"][0]["hybrid_tokens_per_s"] > 0
    names = [r["name"] for r in data["ratios"]]
    assert sum(n.startswith("P3 prefill") for n in names) == 2 and sum(n.startswith("P4 decode") for n in names) == 1
    assert sum("cache bytes" in n for n in names) == 2  # one per length: 64 (prefill and decode) and 128


def test_kernels_time_the_naive_branch_and_sdpa_on_cpu(tmp_path, capsys):
    data = run_smoke("attention_kernels", tmp_path, capsys, "--passes", "fwd,fwd+bwd")
    assert {(row["pass"], row["length"]) for row in data["rows"]} == {(p, n) for p in ("fwd", "fwd+bwd")
                                                                      for n in (64, 128)}
    for row in data["rows"]:
        assert row["naive_s"] > 0 and row["sdpa_s"] > 0 and "fla_s" not in row
    assert all(r["value"] == pytest.approx(row["sdpa_s"] / row["naive_s"])
               for r, row in zip(data["ratios"], data["rows"]))


def test_selection_cost_runs_every_method_on_the_same_batches(tmp_path, capsys):
    data = run_smoke("selection_cost", tmp_path, capsys)
    rows = {row["method"]: row for row in data["rows"]}
    assert set(rows) == {"gate_search", "leave_one_out", "kl"}
    assert {row["tokens"] for row in rows.values()} == {2 * 64}
    assert rows["leave_one_out"]["forward_passes"] == rows["kl"]["forward_passes"] == (4 + 1) * 2
    loo = data["ratios"][0]
    assert loo["target"] == ">= 5.0"
    assert loo["value"] == pytest.approx(rows["leave_one_out"]["seconds"] / rows["gate_search"]["seconds"])


def test_summary_renders_every_results_file_and_flags_an_unfinished_one(tmp_path, capsys):
    run_smoke("attention_kernels", tmp_path, capsys, "--passes", "fwd")
    partial = json.loads((tmp_path / "attention_kernels.json").read_text()) | {"complete": False, "benchmark": "other"}
    (tmp_path / "other.json").write_text(json.dumps(partial))
    (tmp_path / "junk.json").write_text("[1, 2]")
    from bench.summary import summarize

    text = summarize(tmp_path)
    assert text.count("## Kernels") == 2 and "INCOMPLETE" in text and "junk.json" in text


def test_every_mode_backpropagates_to_the_embeddings_and_only_mixed_to_the_gates():
    from bench.morph_steps import build_morphable, set_mode
    from bench.common import retrieval_batch

    model = build_morphable("tiny", torch.device("cpu"), torch.float32)
    batch = retrieval_batch(model.lm.config.vocab_size, 64, 2, torch.device("cpu"))
    captured = []
    model.lm.get_input_embeddings().register_forward_hook(lambda m, i, out: captured.append(out))
    for mode in ("mixed", "full", "linear"):
        set_mode(model, mode)
        captured.clear()
        out = model(batch["input_ids"], labels=batch["labels"])
        captured[0].retain_grad()
        out["loss_sum"].backward()
        assert captured[0].grad is not None and captured[0].grad.abs().sum() > 0, mode
        gate_grad = model.gates.gate_logits.grad
        assert (gate_grad is not None and gate_grad.abs().sum() > 0) == (mode == "mixed"), mode
        model.gates.zero_grad(set_to_none=True)
    assert not any(p.requires_grad for p in model.lm.parameters())


def test_flops_count_the_weights_a_token_meets():
    from bench.common import build_lm, llama_config
    from bench.flops import attention_flops_per_token, matmul_params, model_flops_per_token, mfu

    config = llama_config("llama3-8b")
    embedding, norms = config.vocab_size * config.hidden_size, (2 * config.num_hidden_layers + 1) * config.hidden_size
    assert matmul_params(config) + embedding + norms == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    lm = build_lm("tiny", torch.device("cpu"), torch.float32)
    counted = sum(p.numel() for name, p in lm.named_parameters() if "embed_tokens" not in name and "norm" not in name)
    assert matmul_params(lm.config) == counted
    n, seq = matmul_params(config), 8192
    causal_attention = 2 * config.num_attention_heads * config.head_dim * seq * config.num_hidden_layers
    assert attention_flops_per_token(config, seq) == causal_attention
    assert model_flops_per_token(config, seq) == 6 * n + 3 * causal_attention
    assert model_flops_per_token(config, seq, weight_grads=False) == 4 * n + 3 * causal_attention
    assert model_flops_per_token(config, seq, training=False) == 2 * n + causal_attention
    hybrid = attention_flops_per_token(config, seq, num_linear_layers=24)
    assert hybrid == 8 * causal_attention / 32 + 24 * 4 * config.num_attention_heads * config.head_dim ** 2
    assert mfu(989.4e12, 1.0, "NVIDIA H100 80GB HBM3") == pytest.approx(1.0) and mfu(1.0, 1.0, "cpu") is None


def test_largest_fitting_length_doubles_then_bisects():
    from bench.common import largest_fitting_length

    tried = []

    def fits(n):
        tried.append(n)
        return n <= 5000

    assert largest_fitting_length(fits, 1024, 131072, granularity=256) == 4864
    assert tried[:4] == [1024, 2048, 4096, 8192]
    assert largest_fitting_length(lambda n: True, 1024, 3000) == 3000
    assert largest_fitting_length(lambda n: False, 1024, 3000) is None


def test_lengths_parse_as_the_flags_write_them():
    from bench.common import format_length, parse_lengths

    assert parse_lengths("8K,32k, 4096") == [8192, 32768, 4096]
    assert parse_lengths("") == []
    assert format_length(131072) == "128K" and format_length(100) == "100"


def test_distill_step_runs_p5_the_estimator_check_and_both_p6_searches(tmp_path, capsys, monkeypatch):
    """The real ZeRO-3 engine in a world of one (the env is restored after); a simulated OOM in the backward of steps
    over 192 tokens makes both P6 searches find 192 and the distill one rebuild its engine, freeing the old one."""
    import socket

    from bench.flops import attention_flops_per_token, matmul_params, model_flops_per_token
    from flashmorph.estimate import EstimateSetup, estimate, shape_from_hf_config

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    data = run_smoke("distill_step", tmp_path, capsys, "--simulate-oom-above", "192")
    rows = data["rows"]

    (p5,) = [row for row in rows if row["kind"] == "p5"]
    assert p5["full_layers"] == [0]  # 1/4 of the tiny shape's 4 layers
    # LoRA r = 16 on q (64->64), k (64->32), v (64->32), o (64->64) of the 3 linear layers: r * (in + out) each
    assert p5["lora_params"] == 3 * 16 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    from bench.common import llama_config

    config, length = llama_config("tiny"), 64
    student = model_flops_per_token(config, length, weight_grads=False, num_linear_layers=3) + 6 * p5["lora_params"]
    teacher = 2 * matmul_params(config) + attention_flops_per_token(config, length)
    assert p5["flops_per_token"]["model"] == pytest.approx(student + teacher)
    assert p5["model_flops"] == pytest.approx((student + teacher) * length) and p5["step_s"] > 0
    assert p5["mfu"] is None and data["ratios"][0]["value"] is None  # no bf16 peak for a CPU: never a made-up MFU

    estimates = [row for row in rows if row["kind"] == "estimate"]
    assert [row["length"] for row in estimates] == [64, 128]
    shape = shape_from_hf_config(config.to_dict())
    for row in estimates:
        expected = estimate(shape, EstimateSetup(gpus=1, seq_len=row["length"], dtype="float32", trainable="lora",
                                                 lora_rank=16, full_layers=1, loss_chunk=32, vocab_chunk=128))
        assert row["estimated_allocated_bytes"] == pytest.approx(expected.allocated)
        assert row["measured_peak_bytes"] is None  # CPU: no allocator statistics

    probes = {kind: [(row["length"], row["fits"]) for row in rows if row["kind"] == kind]
              for kind in ("p6_distill", "p6_gate_search")}
    assert probes["p6_distill"] == [(256, False), (192, True)]  # 64 and 128 were measured before: not probed again
    assert probes["p6_gate_search"] == [(64, True), (128, True), (256, False), (192, True)]
    for key in ("p6_distill", "p6_gate_search"):
        assert data[key]["longest"] == 192 and data[key]["first_oom"] == 256 and data[key]["complete"] is True
    assert data["engine_builds"] == 2 and data["engines_not_freed"] == 0
    p6 = [r for r in data["ratios"] if r["name"].startswith("P6")]
    assert [r["value"] for r in p6] == [192 / 1024, 192 / 1024] and p6[0]["target"] == ">= 256"


def test_search_longest_probes_the_predicted_length_and_its_neighbour_first():
    from bench.distill_step import search_longest

    step, limit = 8192, 524288
    tried = []

    def fits(n):  # memoised, as LengthProbe is: `tried` lists the steps a GPU would run
        if n not in tried:
            tried.append(n)
        return n <= 100_000  # 98304 = 12 steps is the answer

    assert search_longest(fits, 32768, limit, step, guess=99_000) == 98304
    assert tried == [98304, 106496]  # a right guess: two probes
    for guess in (200_000, 50_000, None, 10):  # too high, too low, none, below the known length: still right
        tried.clear()
        assert search_longest(fits, 32768, limit, step, guess=guess) == 98304, guess
        assert len(tried) <= 7
    assert search_longest(lambda n: True, 32768, limit, step, guess=10**9) == limit


def test_p6_stops_before_a_probe_that_would_pass_the_time_budget():
    from types import SimpleNamespace

    from bench.distill_step import Deadline, LengthProbe, p6_ratio, run_search

    rows, steps = [], []
    table = SimpleNamespace(add_row=lambda **row: rows.append(row))
    probe = LengthProbe("test", steps.append, lambda: None, lambda n: 1.0, Deadline(1e-9), table,
                        torch.device("cpu"))
    probe.known[1024] = (True, 5.0)  # measured before: 5 s at 1K, so 2K is predicted at 10 s
    search = run_search(probe, 1024, SimpleNamespace(p6_limit=8192, p6_granularity=1024), guess=None)
    assert steps == [] and rows == []  # nothing ran
    assert search["longest"] == 1024 and search["complete"] is False and "2K" in search["stopped"]
    line = p6_ratio("P6 test", search, ">= 256", None)
    assert line.value == 1.0 and "LOWER BOUND" in line.detail


def test_profile_step_smoke(tmp_path):
    from bench import profile_step

    results = profile_step.main(["--smoke", "--out", str(tmp_path)])
    for layout in ("softmax", "hybrid"):
        for kind in ("prefill", "decode"):
            entry = results[f"{kind}_{layout}"]
            assert entry["wall_s"] > 0 and entry["top"], (kind, layout)
    assert (tmp_path / "profile_step.json").is_file()
