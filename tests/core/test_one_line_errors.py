"""Every `fastpmd` subcommand answers a bad command line with one line, `fastpmd CMD: error: ... (see --help)`,
exit status 2, before any work: argparse's own errors (no usage block), bench's --tau and --seq-len, and
kernels-report's --out."""
import importlib

import pytest

COMMANDS = {"train": "fastpmd.train.cli", "bench": "fastpmd.bench.cli", "demo": "fastpmd.demo",
            "kernels-report": "fastpmd.kernels.report", "theory-figures": "fastpmd.theory.figures",
            "study": "fastpmd.train.study"}


def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]
    return err[0]


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--out"]], ids=["unknown", "missing-value"])
def test_argparse_errors_are_one_line(name, argv, capsys):
    main = importlib.import_module(COMMANDS[name]).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = _one_line(capsys, f"fastpmd {name}: error: ", "(see --help)")
    assert "usage:" not in line


@pytest.mark.parametrize("argv,flag", [
    (["--tau", "nan"], "--tau"), (["--tau", "inf"], "--tau"), (["--tau", "1e-9"], "--tau"),
    (["--hidden", "8", "--vocab", "16", "--tokens", "8", "--seq-len", "0"], "--seq-len"),
    (["--hidden", "8", "--vocab", "16", "--tokens", "8", "--seq-len", "-4"], "--seq-len"),
])
def test_bench_rejects_bad_tau_and_seq_len(argv, flag, capsys, monkeypatch):
    from fastpmd.bench import cli, runner

    monkeypatch.setattr(runner, "run", lambda cfg: pytest.fail("the benchmark ran"))
    argv = argv if "--hidden" in argv else ["--preset", "tiny", *argv]
    assert cli.main([*argv, "--no-memory", "--quiet"]) == 2
    _one_line(capsys, "fastpmd bench: error: ", flag)


@pytest.mark.parametrize("where", ["a_file", "a_file/sub", "/proc/fastpmd-no-such-dir"])
def test_kernels_report_checks_out_first(where, tmp_path, capsys, monkeypatch):
    from fastpmd.kernels import report

    monkeypatch.setattr(report, "report", lambda *a, **k: pytest.fail("compiled before --out was checked"))
    (tmp_path / "a_file").write_text("x")
    out = where if where.startswith("/") else str(tmp_path / where)
    assert report.main(["--out", out]) == 2
    _one_line(capsys, "fastpmd kernels-report: error: ", "--out")
