"""--tune's candidates and its choice, and the command lines they become (pure: no engine runs)."""

from dataclasses import replace

from bundler import planner
from bundler.box import tune
from bundler.engines import llama_cpp, vllm
from tests.unit.test_planner import GEMMA, _device_box, _qwen7b, box


def _row(label, tok_by_level, reference=False, error=""):
    return {"label": label, "reference": reference, "error": error, "flags": "",
            "levels": [{"concurrency": c, "tok_s": t} for c, t in tok_by_level.items()]}


def test_the_plan_stays_unless_another_beats_it_by_more_than_the_noise():
    plan = _row("plan", {1: 50, 50: 1000})
    assert tune.choose([plan, _row("defaults", {1: 99, 50: 9999}, reference=True), _row("a", {1: 60, 50: 1020})],
                       50) == 0
    assert tune.choose([plan, _row("a", {1: 40, 50: 1100}), _row("b", {1: 40, 50: 1200})], 50) == 2
    # a failed candidate is never chosen, however fast its figures before it failed
    assert tune.choose([plan, _row("a", {1: 40, 50: 5000}, error="2 failed requests at 50")], 50) == 0
    # the plan failed: the fastest that served
    assert tune.choose([_row("plan", {}, error="engine died"), _row("a", {50: 10}), _row("b", {50: 20})], 50) == 2


def test_vllm_candidates_on_two_gpus_cover_the_splits_the_front_end_and_the_defaults():
    hw = _device_box("device-h200x2-probe.json")
    plan = planner.plan("m", _qwen7b(), hw, planner.Intent(concurrency=50, context=4096),
                        engines_available=planner.ALL_ENGINES)
    cands = tune.candidates(plan, _qwen7b(), hw, "0.26.0")
    labels = [c.label for c in cands]
    assert labels[:2] == ["plan", "engine defaults"] and cands[1].reference
    assert "TP 1 x DP 2" in labels and "plan + throughput mode" in labels
    dp = next(c for c in cands if c.label == "TP 1 x DP 2")
    assert (dp.plan.tensor_parallel, dp.plan.data_parallel, dp.plan.max_num_seqs) == (1, 2, 1024)
    assert dp.plan.api_servers == 0  # vllm serve gives each replica its own
    one = next(c for c in cands if c.label == "plan, 1 API server")
    assert "--api-server-count" not in vllm.launch_argv("python3", "/m", "m", "h", 1, one.plan, safe=False)
    argv = vllm.launch_argv("python3", "/m", "m", "127.0.0.1", 8000, cands[1].plan, safe=False)
    # the reference is `vllm serve MODEL` and nothing else but where to listen and its name
    assert argv == ["python3", "-m", "vllm.entrypoints.cli.main", "serve", "/m", "--served-model-name", "m",
                    "--host", "127.0.0.1", "--port", "8000"]
    planned = vllm.launch_argv("python3", "/m", "m", "127.0.0.1", 8000, plan, safe=True)
    assert planned[:5] == ["python3", "-m", "vllm.entrypoints.cli.main", "serve", "/m"]
    assert "--middleware" in planned and "--disable-custom-all-reduce" in planned  # TP 2, multicast off
    assert planned[planned.index("--api-server-count") + 1] == "2"
    tput = next(c for c in cands if c.label == "plan + throughput mode")
    assert vllm.launch_argv("python3", "/m", "m", "h", 1, tput.plan, safe=False)[-2:] == ["--performance-mode",
                                                                                       "throughput"]


def test_llama_candidates_and_their_command_lines():
    variants = tuple(llama_cpp.CPU_VARIANTS)
    hw = box(cpus=2)
    plan = planner.plan("gemma", GEMMA, hw, planner.Intent(concurrency=4, context=4096), cpu_variants=variants)
    cands = tune.candidates(plan, GEMMA, hw)
    assert [c.label for c in cands] == ["plan", "engine defaults", "plan, KV per slot", "8 slots"]
    argv = llama_cpp.launch_argv("/bin/llama-server", "/m.gguf", "gemma", "127.0.0.1", 8080, cands[1].plan)
    assert argv == ["/bin/llama-server", "--model", "/m.gguf", "--alias", "gemma", "--host", "127.0.0.1", "--port",
                    "8080"]
    planned = llama_cpp.launch_argv("/bin/llama-server", "/m.gguf", "gemma", "127.0.0.1", 8080, plan)
    assert "--kv-unified" in planned
    split = llama_cpp.launch_argv("/bin/llama-server", "/m.gguf", "gemma", "127.0.0.1", 8080, cands[2].plan)
    assert split[-1] == "--no-kv-unified"  # the last of the two switches wins
    eight = llama_cpp.launch_argv("/bin/llama-server", "/m.gguf", "gemma", "127.0.0.1", 8080, cands[3].plan)
    assert eight[eight.index("--parallel") + 1] == "8" and eight[eight.index("--ctx-size") + 1] == str(8 * 4096)


def test_a_builtin_chat_template_is_named_with_jinja_off():
    """With jinja on (llama-server's default) --chat-template takes a jinja template: the name
    "gemma" became the whole prompt and the model never saw the question."""
    plan = planner.plan("gemma", GEMMA, box(), planner.Intent(concurrency=4, context=4096))
    assert plan.chat_template == "gemma"
    argv = llama_cpp.launch_argv("/bin/llama-server", "/m.gguf", "gemma", "127.0.0.1", 8080, plan)
    i = argv.index("--chat-template")
    assert argv[i + 1] == "gemma" and "--no-jinja" in argv[:i]
    own = replace(plan, chat_template="")
    assert "--no-jinja" not in llama_cpp.launch_argv("/b", "/m", "g", "h", 1, own)
