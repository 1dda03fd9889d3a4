"""The CLI as a user runs it: real processes, exit codes, one-line errors, no heavy imports. The
model is the tiny base (tests/tiny_gguf.py), made the default base the way a user would, with
EDGEFT_BASE: what is tested is the CLI, not the answers' language. Commands that decode run one
thread (`--threads 1`): two threads spin-waiting on 2 busy cores make a 12-token answer take 5 s."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_adapter, write_bundle

EDGEFT = [sys.executable, "-m", "edgeft"]
HEAVY = ("torch", "transformers", "peft")


def cli(*args, input: str | None = None, env: dict | None = None, timeout: int = 120):
    e = {k: v for k, v in os.environ.items() if k != "EDGEFT_DEBUG"}
    e.update(env or {})
    return subprocess.run([*EDGEFT, *args], input=input, capture_output=True, text=True, env=e, timeout=timeout)


@pytest.fixture
def tiny(tiny_base) -> dict:
    """The environment that makes the tiny base the default base."""
    return {"EDGEFT_BASE": str(tiny_base)}


def assert_one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: "), r.stderr
    assert len(lines) <= 2 and all(ln.startswith(("error: ", "hint: ")) for ln in lines), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_runtime_imports_no_heavy_stack(tiny):
    code = f"""
import sys
import edgeft
from edgeft import Engine
from edgeft.cli import main
for argv in (["--help"], ["run", "--help"], ["chat", "--help"], ["doctor"], ["serve", "--help"],
             ["run", "--threads", "1", "--max-tokens", "2", "Hello"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("HEAVY=" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **tiny})
    assert "HEAVY=" in r.stdout, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "HEAVY=", r.stdout


def test_help_lists_commands():
    r = cli("--help")
    assert r.returncode == 0
    for c in ("run", "chat", "pull", "doctor", "adapters"):
        assert c in r.stdout


def test_run_answers_and_json(tiny):
    r = cli("run", "--threads", "1", "--max-tokens", "12", "What is the capital of France?", env=tiny)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = cli("run", "--threads", "1", "--json", "--max-tokens", "5", "-", input="Say hello.", env=tiny)
    d = json.loads(r.stdout)
    assert d["completion_tokens"] <= 5 and d["adapters"] == {} and d["ttft_ms"] > 0


def test_run_flash_attn_flag_reaches_llama_cpp(tiny):
    for flag, state in ((["--flash-attn"], "enabled"), ([], "disabled")):
        r = cli("run", *flag, "--threads", "1", "--max-tokens", "3", "Say hello.", env={**tiny, "EDGEFT_VERBOSE": "1"})
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        assert re.search(r"flash_attn\s*=\s*" + state, r.stderr), r.stderr[-2000:]


def test_run_jsonl_swaps_per_line(tiny_base, tiny, tmp_path):
    a = write_adapter(tmp_path / "a.gguf", tiny_base, seed=1, b_std=0.05)
    lines = [{"id": 1, "text": "Write about the sea.", "max_tokens": 8},
             {"id": 2, "text": "Write about the sea.", "adapter": str(a), "max_tokens": 8},
             {"id": 3, "text": "Write about the sea.", "max_tokens": 8},
             "not json", {"text": ""}]
    stdin = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    r = cli("run", "--threads", "1", "--jsonl", input=stdin, env=tiny)
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 1 and "2 line(s) failed" in r.stderr
    assert out[0]["text"] == out[2]["text"] != out[1]["text"]
    assert out[1]["adapters"] == {"a": 1.0} and out[0]["adapters"] == {}
    assert "error" in out[3] and "error" in out[4]


def test_doctor():
    """Lists the manifests' bases whether pulled or not, so it needs no model."""
    r = cli("doctor")
    assert "llama.cpp build" in r.stdout and "smollm2-135m" in r.stdout and "AVX2 = 1" in r.stdout


def test_adapters_list_show_rm(tiny_base, tmp_path):
    home = tmp_path / "home"
    write_bundle(home / "adapters" / "mine", tiny_base, name="mine", rank=4)
    env = {"EDGEFT_HOME": str(home)}
    r = cli("adapters", "list", "--json", env=env)
    names = [row["name"] for row in json.loads(r.stdout)]
    assert "mine" in names
    r = cli("adapters", "show", "mine", env=env)
    assert json.loads(r.stdout)["_file"]["ranks"] == [4]
    r = cli("adapters", "rm", "mine", env=env)
    assert r.returncode == 0 and not (home / "adapters" / "mine").exists()
    assert_one_line_error(cli("adapters", "rm", "mine", env=env), "no user adapter")


def test_adapters_add_then_run_by_name(tiny_base, tiny, tmp_path):
    """A bundle registered with `adapters add --name` answers by that name, with its task card."""
    home = tmp_path / "home"
    task = {"template": "{input}", "output": {"type": "labels", "labels": ["yes", "no"]},
            "generation": {"max_tokens": 5}}
    src = write_bundle(tmp_path / "src" / "yn", tiny_base, name="yn", task=task)
    env = {**tiny, "EDGEFT_HOME": str(home)}
    r = cli("adapters", "add", str(src), "--name", "answer", env=env)
    assert r.returncode == 0 and (home / "adapters" / "answer" / "adapter.gguf").is_file(), r.stderr
    assert_one_line_error(cli("adapters", "add", str(src), "--name", "answer", env=env), "already registered")
    r = cli("run", "--threads", "1", "--json", "--adapter", "answer", "Is it raining?", env=env)
    d = json.loads(r.stdout)
    assert d["adapters"] == {"answer": 1.0} and d["value"] in ("yes", "no") and d["text"] == d["value"], r.stderr


# -- the error cases the issue lists ---------------------------------------------------------

def test_missing_base(tmp_path):
    assert_one_line_error(cli("run", "--base", str(tmp_path / "nope.gguf"), "hi"), "not found")
    assert_one_line_error(cli("run", "--base", "no-such-model", "hi"), "unknown base model")


def test_garbage_and_truncated_base(tiny_base, tmp_path):
    g = tmp_path / "garbage.gguf"
    g.write_bytes(os.urandom(10000))
    assert_one_line_error(cli("run", "--base", str(g), "hi"), "not a GGUF")
    t = tmp_path / "trunc.gguf"
    data = tiny_base.read_bytes()
    t.write_bytes(data[: len(data) // 2])          # the header whole, the tensors cut off
    assert_one_line_error(cli("run", "--base", str(t), "hi"))


def test_bad_adapters(tiny_base, tiny, tmp_path):
    g = tmp_path / "garbage.gguf"
    g.write_bytes(b"GGUF" + os.urandom(5000))
    assert_one_line_error(cli("run", "--adapter", str(g), "hi", env=tiny), "garbage.gguf")
    t = write_adapter(tmp_path / "trunc.gguf", tiny_base)
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    assert_one_line_error(cli("run", "--adapter", str(t), "hi", env=tiny), "trunc.gguf")
    q = write_adapter(tmp_path / "qwen.gguf", tiny_base, arch="qwen2")
    assert_one_line_error(cli("run", "--adapter", str(q), "hi", env=tiny), "architecture")

    def wrong_shape(ts):
        ts["blk.0.attn_q.weight.lora_b"] = ts["blk.0.attn_k.weight.lora_b"]

    s = write_adapter(tmp_path / "shape.gguf", tiny_base, mutate=wrong_shape)
    assert_one_line_error(cli("run", "--adapter", str(s), "hi", env=tiny), "do not fit")
    assert_one_line_error(cli("run", "--adapter", "no-such-adapter", "hi", env=tiny), "unknown adapter")
    assert_one_line_error(cli("run", "--adapter", "x=abc", "hi", env=tiny), "bad adapter scale")


def test_prompt_longer_than_context(tiny):
    assert_one_line_error(cli("run", "--ctx", "256", "word " * 400, env=tiny), "context")


def test_empty_input():
    """Refused before any model is opened."""
    assert_one_line_error(cli("run", "", input=""), "empty input")
    assert_one_line_error(cli("run", input="   \n"), "empty input")


def test_debug_shows_traceback(tmp_path):
    r = cli("run", "--base", str(tmp_path / "nope.gguf"), "hi", env={"EDGEFT_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_chat_session_with_slash_commands(tiny_base, tiny, tmp_path):
    a = write_adapter(tmp_path / "a.gguf", tiny_base, seed=1, b_std=0.05)
    b = write_adapter(tmp_path / "b.gguf", tiny_base, seed=2, b_std=0.05)
    script = "\n".join(["/help", "Hi!", f"/use {a}=1,{b}=0.5", "/adapters", "Hello again",
                        "/stats", "/use none", "/reset", "/bogus", "/use no-such", "/exit"]) + "\n"
    r = cli("chat", "--threads", "1", "--adapter", str(a), "--max-tokens", "8", input=script, env=tiny)
    assert r.returncode == 0, r.stderr
    assert "/use NAME" in r.stdout                 # help
    assert "adapters: a=1, b=0.5" in r.stdout      # mixed swap
    assert "* a" in r.stdout and "* b" in r.stdout  # both active in /adapters
    assert "swaps" in r.stdout and "TTFT" in r.stdout
    assert "adapters: none" in r.stdout
    assert "unknown command /bogus" in r.stdout
    assert "unknown adapter 'no-such'" in r.stderr


def test_chat_ctrl_c_stops_answer_not_session(tiny):
    import signal
    import time

    # a shell that starts the tests in the background makes them ignore SIGINT, and the child
    # would inherit that: give it the default disposition, as a terminal would. 8000 tokens:
    # several seconds even for the tiny base, which answers 2000 in about half a second
    p = subprocess.Popen([*EDGEFT, "chat", "--ctx", "8192", "--threads", "1", "--max-tokens", "8000"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                         env={**os.environ, **tiny},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        p.stdin.write(b"Write a very long story about a dragon and a knight.\n")
        p.stdin.flush()
        os.set_blocking(p.stdout.fileno(), False)
        seen, deadline = "", time.monotonic() + 90
        def answer_chars() -> int:
            return len(seen.split("> ", 1)[1]) if "> " in seen else 0

        while answer_chars() < 40 and time.monotonic() < deadline:  # wait until the answer streams
            chunk = p.stdout.read()
            seen += (chunk or b"").decode("utf-8", "replace")
            time.sleep(0.05)
        assert answer_chars() >= 40, seen
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        p.stdin.write(b"/stats\n/exit\n")
        p.stdin.flush()
        os.set_blocking(p.stdout.fileno(), True)
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    out = seen + out.decode("utf-8", "replace")
    assert p.returncode == 0, err
    assert "[stopped]" in out
    assert "swaps" in out  # the session went on and answered /stats


def test_engine_options_reach_the_command_as_one_object():
    """run and chat get --ctx, --threads, ... from one definition (cli/common.engine_options)."""
    import typer
    from typer.testing import CliRunner

    from edgeft.cli.common import EngineOptions, engine_options

    seen = []

    def cmd(text: str = typer.Argument("x"), *, opts: EngineOptions) -> None:
        seen.append((text, opts))

    app = typer.Typer()
    app.command()(engine_options(ctx=4096)(cmd))
    r = CliRunner().invoke(app, ["hi", "--ctx", "123", "-t", "2", "--adapter-dir", "d1", "--adapter-dir", "d2",
                                 "--prompt-cache-mb", "0", "--force"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == ("hi", EngineOptions(ctx=123, threads=2, adapter_dir=["d1", "d2"], prompt_cache_mb=0.0,
                                            force=True))
    r = CliRunner().invoke(app, [])
    assert r.exit_code == 0 and seen[-1] == ("x", EngineOptions(ctx=4096))   # the command's own default
    assert CliRunner().invoke(app, ["--ctx", "many"]).exit_code != 0
