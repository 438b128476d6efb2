"""What a run reports besides its printed lines: the metrics log (JSON lines),
TensorBoard scalars and MLPerf log lines. The training loop calls one `RunLog`:

    run_start(config)  epoch_start(epoch)  train_window(record)  test_start(epoch, iteration, nbatches)
    test_end(record)   epoch_end(epoch)    run_end(status)       close()

train_window records: epoch, iteration (1-based, within the epoch), nbatches, global_iteration, loss,
samples, seconds, samples_per_second, lr.
test_end records: the same position plus loss, accuracy, auc, best_accuracy, best_auc, samples.
"""

from __future__ import annotations

import json
import math
import os
import time

from dlrmkit.mlperf_logger import MLPerfLogger


class RunLogError(RuntimeError):
    """An output that cannot be written or a missing optional package; one line for the user."""


class RunLog:
    """Receives a run's events; this base class ignores them all."""

    def run_start(self, config: dict): ...
    def epoch_start(self, epoch: int): ...
    def train_window(self, record: dict): ...
    def test_start(self, epoch: int, iteration: int, nbatches: int): ...
    def test_end(self, record: dict): ...
    def epoch_end(self, epoch: int): ...
    def run_end(self, status: str): ...
    def close(self): ...


class RunLogs(RunLog):
    """Passes every event to each of `logs`, in order."""

    def __init__(self, logs):
        self.logs = list(logs)

    def run_start(self, config):
        for log in self.logs:
            log.run_start(config)

    def epoch_start(self, epoch):
        for log in self.logs:
            log.epoch_start(epoch)

    def train_window(self, record):
        for log in self.logs:
            log.train_window(record)

    def test_start(self, epoch, iteration, nbatches):
        for log in self.logs:
            log.test_start(epoch, iteration, nbatches)

    def test_end(self, record):
        for log in self.logs:
            log.test_end(record)

    def epoch_end(self, epoch):
        for log in self.logs:
            log.epoch_end(epoch)

    def run_end(self, status):
        for log in self.logs:
            log.run_end(status)

    def close(self):
        for log in self.logs:
            log.close()


def _clean(value):
    """JSON has no NaN: undefined metrics (AUC with one class) are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog(RunLog):
    """One JSON object per line: {"event": "start" | "train" | "test" | "end", "time": ..., ...}. The file is
    opened (replaced, or with `append` appended to) at the run's start: a run stopped before it (bad flags,
    too little memory, a checkpoint that does not fit) leaves an earlier log as it was."""

    def __init__(self, path: str, append: bool = False):
        self.path, self.append, self.file = path, append, None

    def _write(self, event, record):
        if self.file is None:
            if event != "start":
                return  # before the run started: nothing to record
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self.file = open(self.path, "a" if self.append else "w")
            except OSError as e:
                raise RunLogError(f"--metrics-log-file {self.path}: cannot write ({e.strerror or e})") from None
        line = {"event": event, "time": round(time.time(), 3)}
        line.update({k: _clean(v) for k, v in record.items()})
        try:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk, say
            raise RunLogError(f"--metrics-log-file {self.path}: cannot write ({e.strerror or e})") from None

    def run_start(self, config):
        self._write("start", {"config": config})

    def train_window(self, record):
        self._write("train", dict(record))

    def test_end(self, record):
        self._write("test", record)

    def run_end(self, status):
        self._write("end", {"status": status})

    def close(self):
        if self.file is None:
            return
        try:
            self.file.close()
        except OSError as e:
            raise RunLogError(f"--metrics-log-file {self.path}: cannot write ({e.strerror or e})") from None


class TensorBoardLog(RunLog):
    """Scalars Train/{Loss,LR,SamplesPerSec} and Test/{Loss,Acc,AUC} against the global iteration."""

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RunLogError("--tensor-board-filename needs the tensorboard package (pip install tensorboard)")
        self.log_dir, self.writer_class, self.writer = log_dir, SummaryWriter, None

    def run_start(self, config):  # the event file is created here: none for a run stopped before its start
        try:
            self.writer = self.writer_class(log_dir=self.log_dir)
        except OSError as e:
            raise RunLogError(f"--tensor-board-filename {self.log_dir}: cannot write ({e.strerror or e})") from None

    def train_window(self, record):
        step = record["global_iteration"]
        self.writer.add_scalar("Train/Loss", record["loss"], step)
        if record.get("lr") is not None:
            self.writer.add_scalar("Train/LR", record["lr"], step)
        self.writer.add_scalar("Train/SamplesPerSec", record["samples_per_second"], step)

    def test_end(self, record):
        step = record["global_iteration"]
        self.writer.add_scalar("Test/Loss", record["loss"], step)
        self.writer.add_scalar("Test/Acc", record["accuracy"], step)
        if not math.isnan(record["auc"]):
            self.writer.add_scalar("Test/AUC", record["auc"], step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


class MLPerfLog(RunLog):
    """The MLPerf DLRM benchmarks' events, as `:::MLLOG` lines (see mlperf_logger.py): config["benchmark"]
    `dlrm` (DLRM, dot interaction; training rules 2.1.0) or `dlrm_dcnv2` (DLRM-DCNv2; rules 4.1.0), each
    with its rules' hyperparameter keys."""

    def __init__(self, logger: MLPerfLogger | None = None):
        self.mllog = logger or MLPerfLogger()
        self.batches_per_epoch = None
        self.mllog.event("cache_clear", True)
        self.mllog.start("init_start")

    def run_start(self, config):
        benchmark = config.get("benchmark", "dlrm")
        for key, value in (("submission_benchmark", benchmark), ("submission_org", "reference_implementation"),
                           ("submission_division", "closed"), ("submission_status", "onprem"),
                           ("submission_platform", config.get("platform", "reference_implementation"))):
            self.mllog.event(key, value)
        self.mllog.event("seed", config["seed"])
        self.mllog.event("global_batch_size", config["global_batch_size"])
        self.mllog.event("gradient_accumulation_steps", config["gradient_accumulation_steps"])
        self.mllog.event("opt_name", config["optimizer"])
        self.mllog.event("opt_base_learning_rate", config["learning_rate"])
        self.mllog.event("opt_learning_rate_warmup_steps", config["warmup_steps"])
        if benchmark == "dlrm_dcnv2":  # the DLRM-DCNv2 hyperparameter names of the MLPerf rules
            self.mllog.event("opt_learning_rate_decay_start_step", config["decay_start_step"])
            self.mllog.event("opt_learning_rate_decay_steps", config["decay_steps"])
            if "adagrad_eps" in config:  # the Adagrads: no learning-rate decay, weight decay or initial sums
                self.mllog.event("opt_adagrad_learning_rate_decay", 0)
                self.mllog.event("opt_weight_decay", 0)
                self.mllog.event("opt_adagrad_initial_accumulator_value", 0)
                self.mllog.event("opt_adagrad_epsilon", config["adagrad_eps"])
        else:  # the DLRM hyperparameter names of the MLPerf rules
            self.mllog.event("sgd_opt_base_learning_rate", config["learning_rate"])
            self.mllog.event("lr_decay_start_steps", config["decay_start_step"])
            self.mllog.event("sgd_opt_learning_rate_decay_steps", config["decay_steps"])
            self.mllog.event("sgd_opt_learning_rate_decay_poly_power", 2)
        self.mllog.event("train_samples", config["train_samples"])
        self.mllog.event("eval_samples", config["eval_samples"])
        for tensor in config.get("initialized_tensors", ()):
            self.mllog.event("weights_initialization", metadata={"tensor": tensor})
        self.batches_per_epoch = config.get("batches_per_epoch")
        self.mllog.end("init_stop")
        self.mllog.start("run_start")

    def epoch_start(self, epoch):
        self.mllog.start("block_start", metadata={"first_epoch_num": epoch + 1, "epoch_count": 1})
        self.mllog.start("epoch_start", metadata={"epoch_num": epoch + 1})

    def _epoch_num(self, epoch, iteration, nbatches):
        """The reference's (j + 1) / batches_in_epoch + epoch + 1: 1-based, like epoch_start, and a
        fraction of the whole epoch (not of a --num-batches cap)."""
        return epoch + 1 + iteration / (self.batches_per_epoch or nbatches)

    def test_start(self, epoch, iteration, nbatches):
        self.mllog.start("eval_start", metadata={"epoch_num": self._epoch_num(epoch, iteration, nbatches)})

    def test_end(self, record):
        epoch_num = self._epoch_num(record["epoch"], record["iteration"], record["nbatches"])
        self.mllog.event("eval_accuracy", _clean(record["auc"]), metadata={"epoch_num": epoch_num})
        self.mllog.end("eval_stop", metadata={"epoch_num": epoch_num})

    def epoch_end(self, epoch):
        self.mllog.end("epoch_stop", metadata={"epoch_num": epoch + 1})
        self.mllog.end("block_stop", metadata={"first_epoch_num": epoch + 1})

    def run_end(self, status):
        self.mllog.end("run_stop", metadata={"status": status})
