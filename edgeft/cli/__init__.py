"""The `edgeft` command: a thin typer layer over the library.

Each command group lives in its own module with a `register(app)` function; modules import
nothing heavy at the top, so `edgeft --help` stays instant and never loads torch.
"""

from __future__ import annotations

import os
import sys

import typer

from ..errors import EdgeftError

app = typer.Typer(
    name="edgeft",
    help="One quantized base model, many LoRA task adapters hot-swapped in a millisecond.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_COMMAND_MODULES = ("run", "manage", "card", "convert", "train", "bench", "serve", "export")


def _register_all() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # command group not part of this build
            raise
        mod.register(app)


_register_all()


CRASH_REPORTED = ("run", "chat", "eval", "train", "curve", "merge", "adapters", "doctor")


def main(argv: list[str] | None = None) -> None:
    debug = bool(os.environ.get("EDGEFT_DEBUG"))
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in CRASH_REPORTED:   # single-threaded commands; serve keeps the default
        from ..crash import install_crash_reporter   # no llama_cpp import: --help stays fast

        install_crash_reporter()
    try:
        rc = app(args=argv, prog_name="edgeft", standalone_mode=False)
        if isinstance(rc, int) and rc:  # click returns (not raises) Exit codes in this mode
            raise SystemExit(rc)
    except EdgeftError as e:
        if debug:
            raise
        raise SystemExit(_print(e.message, e.hint))
    except typer.Exit as e:
        raise SystemExit(e.exit_code)
    except typer.Abort:
        raise SystemExit(_print("aborted", None, code=130))
    except KeyboardInterrupt:
        raise SystemExit(130)
    except Exception as e:  # click usage errors (typer vendors its own click) and real bugs
        if callable(getattr(e, "show", None)) and hasattr(e, "exit_code"):
            e.show()
            raise SystemExit(e.exit_code or 1)
        if debug:
            raise
        raise SystemExit(_print(f"internal error: {type(e).__name__}: {e}",
                                "this is a bug in edgeft; rerun with EDGEFT_DEBUG=1 for the traceback and report it"))


def _print(message: str, hint: str | None, code: int = 1) -> int:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return code


if __name__ == "__main__":  # python -m edgeft.cli
    main(sys.argv[1:])
