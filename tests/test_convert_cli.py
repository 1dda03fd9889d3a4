"""`edgeft convert` on the command line: output, --json, one-line errors with a hint, exit 1,
and `edgeft --help` that imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("peft")

from convert_helpers import make_peft, tiny  # noqa: E402

from edgeft.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, base = tiny("llama")
    root = tmp_path_factory.mktemp("cli")
    make_peft(model, root / "good", target_modules=["q_proj", "v_proj"])
    make_peft(model, root / "dora", use_dora=True, bias="all")
    return base, root


def test_convert_prints_where_and_what(isolated_home, setup, capsys):
    base, root = setup
    main(["convert", str(root / "good"), "--base", str(base), "--name", "good-one"])
    out = capsys.readouterr().out
    assert "good-one: " + str(isolated_home / "adapters" / "good-one") in out
    assert "rank 4, alpha 8, f32" in out and "edgeft run --adapter good-one" in out


def test_convert_json(tmp_path, setup, capsys):
    base, root = setup
    main(["convert", str(root / "good"), "--base", str(base), "-o", str(tmp_path / "b"), "--json", "--outtype", "f16"])
    res = json.loads(capsys.readouterr().out)
    assert res["folder"] == str(tmp_path / "b") and res["adapter"]["dtype"] == "f16" and res["parity"] is None


def test_refusal_is_one_error_line_and_a_hint(tmp_path, setup, capsys):
    base, root = setup
    with pytest.raises(SystemExit) as ei:
        main(["convert", str(root / "dora"), "--base", str(base), "-o", str(tmp_path / "x")])
    assert ei.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("error: cannot convert ") and "DoRA" in err[0] and "bias='all'" in err[0]
    assert err[1].startswith("hint: ")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv,needle", [
    (["convert", "{root}/nope"], "is not a folder"),
    (["convert", "{root}/good", "--outtype", "q4"], "unknown output type 'q4'"),
    (["convert", "{root}/good", "--base", "/no/such/base.gguf"], "base model file not found"),
    (["quantize", "{base}", "--type", "q9", "-o", "{root}/q.gguf"], "unknown quantization type 'q9'"),
    (["merge", "--adapter", "{root}/good", "-o", "{root}/m.gguf"], "is not an adapter bundle"),
])
def test_cli_errors(setup, capsys, argv, needle):
    base, root = setup
    argv = [a.format(root=root, base=base) for a in argv]
    if argv[0] in ("convert", "merge") and "--base" not in argv:
        argv += ["--base", str(base)]
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and needle in err[0], err
    assert len(err) <= 2 and (len(err) == 1 or err[1].startswith("hint: "))


def test_help_imports_no_torch():
    code = ("import sys\nfrom edgeft.cli import main\n"
            "try:\n    main(['convert', '--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\nassert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "PEFT adapter folder" in res.stdout
