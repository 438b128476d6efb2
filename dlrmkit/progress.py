"""What a run shows while it works: a live progress line on a terminal, and a warning when training diverges.

The progress line is a tqdm bar on stderr, drawn only when stderr is a terminal: piped into a log,
stderr gets no bar and no carriage returns. Lines printed while a bar is shown clear it first
(`ProgressBar.write_mode`), so the printed lines stay whole and in order.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time

REFRESH_S = 0.5  # how often the bar's loss is read (on CUDA, reading it waits for the device)


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


class ProgressBar:
    """`it J/N [elapsed<ETA, samples/s, loss]` on stderr when `show` and stderr is a terminal; else nothing."""

    def __init__(self, desc: str, total: int, initial: int = 0, show: bool = True, with_loss: bool = True):
        self.bar = None
        self.with_loss = with_loss
        self.loss_sum = None  # a device tensor: the losses are added up without reading them back
        self.loss_samples = 0
        self.samples_per_it = 0
        self.next_refresh = 0.0
        if show and stderr_is_terminal() and total > initial:
            from tqdm import tqdm

            sized = terminal_columns() > 0  # a terminal of unknown size (0 x 0) gets 100 x 20
            self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, leave=False,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20,
                            mininterval=REFRESH_S,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| it {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}{postfix}]")

    @property
    def active(self) -> bool:
        return self.bar is not None

    def step(self, samples: int, loss_sum=None, loss_samples: int = 0):
        """One iteration of `samples` samples; `loss_sum` (a tensor) sums the loss over `loss_samples` of them."""
        if self.bar is None:
            return
        if loss_sum is not None:
            self.loss_sum = loss_sum.detach().double() if self.loss_sum is None else self.loss_sum + loss_sum.detach()
            self.loss_samples += loss_samples
        self.samples_per_it = samples
        now = time.monotonic()
        if now >= self.next_refresh:
            self.next_refresh = now + REFRESH_S
            self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.update(1)

    def postfix(self) -> str:
        parts = []
        rate = self.bar.format_dict.get("rate")  # smoothed iterations/s, once the bar has been redrawn
        if not rate:
            elapsed = self.bar.format_dict["elapsed"]
            rate = (self.bar.n - self.bar.initial) / elapsed if elapsed > 0 else None
        if rate:
            parts.append(f"{rate * self.samples_per_it:,.0f} samples/s")
        if self.with_loss and self.loss_sum is not None and self.loss_samples:
            parts.append(f"loss {self.loss_sum.item() / self.loss_samples:.4f}")  # since the last refresh
            self.loss_sum, self.loss_samples = None, 0
        return ", ".join(parts)

    def resume(self):
        """After a pause (a test): the time spent outside the loop does not count towards the rate and ETA."""
        if self.bar is not None:
            self.bar.unpause()

    @contextlib.contextmanager
    def write_mode(self):
        """Clears the bar while a line is printed (to stdout or stderr) and draws it again after."""
        if self.bar is None:
            yield
            return
        self.bar.set_postfix_str(self.postfix(), refresh=False)  # drawn again after the line: up to date
        with self.bar.external_write_mode():
            yield

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# a model predicting the click rate everywhere scores at most ln 2 with BCE and 0.25 with MSE; well above
# that means the predictions sit at 0 or 1 on the wrong side: the step size threw the model off. An
# untrained model can start above these (inputs that saturate its sigmoid), and Adagrad's first steps
# (each moves every weight by the learning rate) can saturate it for a few iterations before it comes
# back, so a loss must stay above the limit on two printed windows in a row spanning at least
# SATURATED_ITERATIONS iterations.
SATURATED_LOSS = {"bce": 4 * math.log(2), "wbce": 4 * math.log(2), "mse": 0.6}
WINDOWS_ABOVE_LIMIT = 2
SATURATED_ITERATIONS = 20


class DivergenceGuard:
    """Names the likely cause: once, as a warning, when the training loss stays saturated; as the error
    that stops the run when the loss or the predictions become NaN/inf."""

    def __init__(self, loss_function: str, optimizer: str, learning_rate: float, loss_weights=(1.0, 1.0)):
        self.loss_function, self.optimizer, self.learning_rate = loss_function, optimizer, learning_rate
        limit = SATURATED_LOSS.get(loss_function)
        if limit is not None and loss_function == "wbce":
            limit *= max(loss_weights)
        self.limit = limit
        self.windows_above = 0
        self.first_above = 0  # the iteration of the first of the windows above the limit in a row
        self.warned = False

    def check(self, loss: float, iteration: int, epoch: int) -> str | None:
        """The warning line, the first time `loss` (a printed training loss) shows divergence; else None."""
        if self.warned:
            return None
        if math.isfinite(loss):
            if self.limit is None or loss <= self.limit:
                self.windows_above = 0
                return None
            if self.windows_above == 0:
                self.first_above = iteration
            self.windows_above += 1
            if self.windows_above < WINDOWS_ABOVE_LIMIT or iteration - self.first_above < SATURATED_ITERATIONS:
                return None
            what = (f"the loss is {loss:.4g} at iteration {iteration} of epoch {epoch}, far above the "
                    f"{'ln 2 = 0.693' if self.loss_function != 'mse' else '0.25'} of a constant prediction: "
                    f"the predictions have saturated at 0 or 1")
        else:
            what = f"the loss is {loss} at iteration {iteration} of epoch {epoch}"
        self.warned = True
        return f"warning: training diverged: {what}; {self.likely_cause()}"

    def non_finite_loss(self, loss: float, iteration: int, epoch: int, bad_input_batch: int | None = None) -> str:
        """The error when the training loss became NaN or inf (the weights are lost: the run stops);
        `bad_input_batch`: the number of a batch of the printed window whose dense features are not finite,
        then the cause named is the data, not the learning rate."""
        cause = (f"training batch {bad_input_batch}'s dense features hold NaN or infinite values (log(x + 1) of an "
                 "integer feature below 0: damaged data?)" if bad_input_batch is not None else self.likely_cause())
        return f"training diverged: the loss is {loss} at iteration {iteration} of epoch {epoch}; {cause}"

    def nan_predictions(self, iteration: int, epoch: int) -> str:
        """The error when the model's predictions became NaN (a loss cannot be computed any more)."""
        return (f"training diverged: the model's predictions are NaN at iteration {iteration} of epoch {epoch}; "
                f"{self.likely_cause()}")

    def likely_cause(self) -> str:
        typical = 0.1 if self.optimizer == "sgd" else 0.01
        smaller = min(self.learning_rate / 10, typical) if self.learning_rate > typical else self.learning_rate / 10
        hint = (f"the likely cause is --learning-rate={self.learning_rate:g}, too high for "
                f"--optimizer={self.optimizer}; try --learning-rate={smaller:g}")
        if self.optimizer != "sgd":
            hint += " or --optimizer=sgd"
        return hint
