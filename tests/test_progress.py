"""Progress on the command line: a bar on a terminal, a few plain lines in a log, nothing when quiet."""
import io

import torch

from ice_ops.progress import PLAIN_REPORTS_PER_PHASE, ProgressReporter


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    """One second per reading."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def run_phase(reporter, label, steps, total=None, preview=None):
    callback = reporter.phase(label)
    for step in range(1, steps + 1):
        callback(step, total or steps, preview)


def test_a_terminal_gets_one_bar_per_phase_redrawn_in_place():
    stream = Terminal()
    reporter = ProgressReporter(stream, clock=Clock())
    run_phase(reporter, "object tokens", 40)
    run_phase(reporter, "intrinsic tokens", 40)
    lines = stream.getvalue().split("\n")
    assert lines[-1] == "", "the last bar ends its line"
    assert len(lines) == 3, "one line on screen per phase, however many steps"
    assert lines[0].count("\r") == 40
    final = lines[0].split("\r")[-1]
    assert final.startswith("object tokens [") and "] 40/40" in final and "." not in final.split("]")[0]
    halfway = lines[1].split("\r")[20]
    assert "20/40" in halfway and "left" in halfway, "a bar under way says how long is left"


def test_a_log_gets_a_few_plain_lines_per_phase_not_one_per_step():
    stream = io.StringIO()
    reporter = ProgressReporter(stream, clock=Clock())
    run_phase(reporter, "object tokens", 100)
    run_phase(reporter, "generating", 15)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(":")[0] for line in lines] == ["object tokens"] * 4 + ["generating"] * 4
    assert len(lines) == 2 * PLAIN_REPORTS_PER_PHASE
    assert lines[3].startswith("object tokens: 100/100") and lines[-1].startswith("generating: 15/15")


def test_quiet_writes_nothing_in_either_mode():
    for stream in (Terminal(), io.StringIO()):
        reporter = ProgressReporter(stream, quiet=True, clock=Clock())
        reporter.message("loading")
        run_phase(reporter, "Stage One", 2, total=3)
        run_phase(reporter, "generating", 15)
        reporter.finish()
        assert stream.getvalue() == ""


def test_a_phase_that_stops_early_still_ends_its_line():
    # Stage One reports against max_concepts and may stop before it (the image is explained).
    terminal = Terminal()
    reporter = ProgressReporter(terminal, clock=Clock())
    run_phase(reporter, "Stage One", 2, total=6, preview=torch.zeros(3, 8, 8))
    reporter.message("found: square")
    *_, bar, message, end = terminal.getvalue().split("\n")
    assert "] 2/6" in bar.split("\r")[-1] and (message, end) == ("found: square", "")

    log = io.StringIO()
    reporter = ProgressReporter(log, clock=Clock())
    run_phase(reporter, "Stage One", 1, total=6)
    reporter.finish()
    assert log.getvalue().splitlines() == ["Stage One: 1/6 (1s)"], "the last step reached is reported"


def test_the_command_line_reporter_follows_quiet(capsys):
    from ice_ops.__main__ import build_parser, progress_reporter

    loud = progress_reporter(build_parser().parse_args(["demo"]))
    quiet = progress_reporter(build_parser().parse_args(["--quiet", "demo"]))
    run_phase(quiet, "Stage One", 3)
    assert capsys.readouterr().err == ""
    run_phase(loud, "Stage One", 3)
    assert "Stage One: 3/3" in capsys.readouterr().err
