"""The training progress display: tqdm's bar on a terminal, one plain line every N steps otherwise.

tqdm handles the terminal's width, the rate and the ETA; a log file or a pipe gets a line per
``every`` steps (and the last step, and any step with a note) that a reader can grep.
"""

from __future__ import annotations

import math
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    """Progress of steps ``start_step+1 … total`` on ``stream``."""

    def __init__(self, total: int, stream: TextIO, every: int, start_step: int = 0) -> None:
        self.total, self.stream, self.every = total, stream, max(1, every)
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0, self.start_step, self.examples = time.monotonic(), start_step, 0
        self.loss_avg: float | None = None
        self.bar = tqdm(total=total, initial=start_step, file=stream, unit="step", dynamic_ncols=True,
                        leave=True) if self.tty else None

    def update(self, step: int, loss: float, lr: float, examples: int, note: str = "") -> None:
        """Record optimizer step ``step`` (its loss, learning rate and examples) and redraw if due."""
        self.examples += examples
        if math.isfinite(loss):  # smoothed so the display is readable; metrics.json keeps every value
            self.loss_avg = loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * loss
        loss_s = f"{self.loss_avg:.4f}" if self.loss_avg is not None else "nan"
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss_s} lr {lr:.2e} {self.examples / elapsed:.1f} ex/s"
                                     + (f" {note}" if note else ""), refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if not (step % self.every == 0 or step == self.total or note):
            return
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        self.stream.write(f"step {step}/{self.total} loss {loss_s} lr {lr:.2e} {self.examples / elapsed:.1f} ex/s "
                          f"ETA {format_duration(eta)}{'  ' + note if note else ''}\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the live bar so another line can be printed; the next update redraws it."""
        if self.bar is not None:
            self.bar.clear()

    def close(self) -> None:
        """End the display (the bar stays on screen)."""
        if self.bar is not None:
            self.bar.close()


def format_duration(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
