"""`fastpmd demo` (what scripts/demo.sh runs): ends with one line naming what was compared, the speed and memory
ratios and where its files went; its plots label the scale around every point."""
import re

from fastpmd import demo


def test_demo_concludes_in_one_line_and_says_where_files_went(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--tokens", "256", "--hidden", "32", "--vocab", "4001", "--reps", "1", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"fused PMD-mean loss vs naive PyTorch \(N=256, H=32, V=4001.*\): [\d.]+x the speed .* "
                     r"[\d.]+x less peak memory \(\d+ vs \d+ MB\)", last), last
    assert f"files in {out}/" in last
    for name in ("results.md", "results.json", "ms_per_token.png", "peak_mem.png"):
        assert (out / name).is_file(), name


def test_plot_limits_are_labelled_ticks_around_every_point(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastpmd.bench.report import _log_axis_with_labelled_ends

    for values in ([132.0, 768.0], [4.84, 8.49, 10.3], [0.37], [1000.0, 2.0e4]):
        fig, ax = plt.subplots()
        _log_axis_with_labelled_ends(ax, values)
        ticks = [t for t in ax.get_yticks()]
        assert min(ticks) <= min(values) and max(ticks) >= max(values), (values, ticks)
        lo, hi = ax.get_ylim()
        assert lo <= min(ticks) and hi >= max(ticks)
        plt.close(fig)
