"""The progress display: start-up phases, then done/total, rate, ETA and errors; log lines without a terminal."""

import io
import time

from pipelines.cli.progress import Progress


def test_log_lines_without_a_terminal():
    out = io.StringIO()
    p = Progress("images", stream=out, tty=False, interval_s=0.2)
    p.starting("starting 2 SR actor(s), loading models")
    time.sleep(0.5)  # nothing arrives: the ticker still reports the phase and how long it has lasted
    p.start(10)
    p.advance(3, 1)
    time.sleep(0.7)
    p.advance(2, 0)
    assert p.done == 6 and p.errors == 1
    rate, eta = p.rate(), p.eta()
    assert rate is not None and 0 < rate <= 6 / 0.7  # counted from the first result (>= 0.7 s ago), not the start
    assert eta is not None and eta > 0
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] starting 2 SR actor(s), loading models")
    assert any("starting 2 SR actor(s), loading models (0:0" in line and "so far)" in line for line in lines)
    assert any("/10 images," in line and "images/s, ETA" in line and "1 failed" in line for line in lines)
    assert "6/10 images" in lines[-1] and "images/s overall, 1 failed" in lines[-1]


def test_terminal_bar_shows_the_same_figures():
    out = io.StringIO()
    with Progress("crops", stream=out, tty=True) as p:
        p.starting("listing SRC")
        p.note("SRC listed: 4 image(s)")
        p.start(4)
        p.advance(4, 0)
    text = out.getvalue()
    assert "SRC listed: 4 image(s)" in text and "4/4" in text and "crops/s overall, 0 failed" in text
