"""train/progress.py: the progress display on a pipe and on a terminal."""

import io

from lorakit.train.progress import Progress, format_duration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_line_every_n_steps_on_a_pipe() -> None:
    stream = io.StringIO()
    progress = Progress(total=20, stream=stream, every=10)
    for step in range(1, 21):
        progress.update(step, loss=2.0, lr=1e-3, examples=4)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # not a terminal: one line every 10 steps
    assert lines[0].startswith("step 10/20 loss 2.0000 lr 1.00e-03 ")
    assert " ex/s ETA " in lines[0] and lines[1].endswith("ETA 0:00")


def test_a_note_is_printed_off_schedule() -> None:
    stream = io.StringIO()
    progress = Progress(total=20, stream=stream, every=10)
    progress.update(3, loss=float("nan"), lr=1e-3, examples=4, note="skipped a non-finite step")
    assert stream.getvalue().startswith("step 3/20 loss nan ") and "skipped a non-finite step" in stream.getvalue()


def test_bar_on_a_terminal_counts_from_the_resumed_step() -> None:
    stream = _Terminal()
    progress = Progress(total=10, stream=stream, every=100, start_step=4)
    for step in range(5, 11):
        progress.update(step, loss=1.5, lr=2e-4, examples=2)
    progress.close()
    out = stream.getvalue()
    assert "10/10" in out and "loss 1.5000" in out and "\r" in out


def test_format_duration() -> None:
    assert format_duration(59.9) == "0:59" and format_duration(3725) == "1:02:05"
