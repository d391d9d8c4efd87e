import importlib
import sys

import pytest

from clipalign.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"clipalign {command}" in out and len(out.splitlines()) > 5


def test_top_level_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in COMMANDS)
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "{missing}", "--out", "{tmp}/run"],
        ["eval", "--checkpoint", "{missing}", "--data", "{tmp}"],
        ["index", "--checkpoint", "{missing}", "--data", "{tmp}", "--out", "{tmp}/idx"],
        ["search", "--index", "{missing}", "--text", "a red circle"],
    ],
)
def test_missing_input_is_a_one_line_error(argv, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "does-not-exist", tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err and "does-not-exist" in err


def _failing(monkeypatch, error: BaseException) -> None:
    import clipalign.cli.plot

    def fail(argv):
        raise error

    monkeypatch.setattr(clipalign.cli.plot, "main", fail)


def test_an_os_error_is_one_line_naming_the_file(monkeypatch, capsys):
    _failing(monkeypatch, PermissionError(13, "Permission denied", "/some/out"))
    assert main(["plot", "run"]) == 2
    assert capsys.readouterr().err == "clipalign plot: error: /some/out: Permission denied\n"


def test_an_unexpected_error_is_one_line_unless_debugging(monkeypatch, capsys):
    _failing(monkeypatch, RuntimeError("it broke\n  in many lines"))
    assert main(["plot", "run"]) == 1
    assert capsys.readouterr().err == \
        "clipalign plot: error: unexpected RuntimeError: it broke (set CLIPALIGN_DEBUG=1 for the traceback)\n"
    monkeypatch.setenv("CLIPALIGN_DEBUG", "1")
    with pytest.raises(RuntimeError, match="it broke"):
        main(["plot", "run"])


def test_an_interrupt_exits_130(monkeypatch, capsys):
    _failing(monkeypatch, KeyboardInterrupt())
    assert main(["plot", "run"]) == 130
    assert capsys.readouterr().err == "clipalign plot: interrupted\n"


@pytest.mark.parametrize("extra, says", [
    (["--n", "0"], "n must be >= 1, got 0"),
    (["--image-size", "8"], "image_size must be >= 16, got 8"),
    (["--n-bad", "-1"], "n_bad must be >= 0, got -1"),
])
def test_synth_options_it_cannot_use_are_one_line_errors_before_anything_is_written(extra, says, tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["synth", "--out", str(out), "--n-eval", "1", *extra]) == 2
    assert capsys.readouterr().err == f"clipalign synth: error: {says}\n" and not out.exists()


def test_synth_into_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["synth", "--out", str(tmp_path / "a-file"), "--n", "1", "--n-eval", "1"]) == 2
    assert capsys.readouterr().err == f"clipalign synth: error: {tmp_path / 'a-file'} exists and is not a folder\n"



@pytest.mark.parametrize("command", ["prep", "synth", "train", "eval", "embed", "index"])
def test_every_long_command_takes_no_progress(command):
    assert "--no-progress" in importlib.import_module(f"clipalign.cli.{command}").build_parser().format_help()


@pytest.mark.parametrize("no_progress", [False, True])
def test_synth_draws_its_bar_on_a_terminal_unless_told_not_to(no_progress, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # tqdm draws where stderr is a terminal
    argv = ["synth", "--out", str(tmp_path / "c"), "--n", "4", "--n-eval", "1", "--workers", "1"]
    assert main(argv + ["--no-progress"] * no_progress) == 0
    assert ("synth: 100%" in capsys.readouterr().err) is not no_progress


@pytest.mark.parametrize("cores, workers", [(1, 1), (3, 3), (16, 8)])
@pytest.mark.parametrize("command", ["prep", "synth"])  # CPU-bound: one process a usable core, at most 8
def test_cpu_bound_commands_default_to_a_process_per_usable_core(command, cores, workers, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    args = importlib.import_module(f"clipalign.cli.{command}").build_parser().parse_args(
        ["manifest.csv", "--out", "o"] if command == "prep" else ["--out", "o"])
    assert args.workers == workers
