"""--mlperf-logging: MLPerf-format log lines, `:::MLLOG {json}`, on stdout.

The keys and events are those of the MLPerf Training DLRM benchmarks (the names of
mlperf_logging.mllog.constants), written without that package:

    :::MLLOG {"namespace": "", "time_ms": 1700000000000, "event_type": "POINT_IN_TIME",
              "key": "seed", "value": 123, "metadata": {"file": "dlrm_s_pytorch.py", "lineno": 42}}

Run structure: cache_clear, init_start, submission_*, hyperparameters,
weights_initialization per tensor, init_stop, run_start; per epoch block_start,
epoch_start, (eval_start, eval_accuracy = test AUC, eval_stop) per test, epoch_stop,
block_stop; run_stop with status success/aborted. Epochs count from 1; a test's epoch_num
is epoch + 1 + (batches done) / (batches per epoch). The log passes the `mlperf-logging`
package's compliance checker (training rules 2.1.0) for the benchmark's model
(3 bottom and 5 top MLP layers), apart from the accuracy target; for DLRM-DCNv2 (the dcn
interaction, benchmark `dlrm_dcnv2`, rules 4.1.0) apart from the accuracy target and the size of
the evaluation set (see run_logs.MLPerfLog).
"""

from __future__ import annotations

import json
import os
import sys
import time

POINT_IN_TIME, INTERVAL_START, INTERVAL_END = "POINT_IN_TIME", "INTERVAL_START", "INTERVAL_END"


class MLPerfLogger:
    """Writes one `:::MLLOG` line per event to `stream`."""

    def __init__(self, stream=None, clock=time.time):
        self.stream = stream
        self.clock = clock

    def _log(self, event_type, key, value, metadata, depth=3):
        frame = sys._getframe(depth - 1)
        meta = {"file": os.path.basename(frame.f_code.co_filename), "lineno": frame.f_lineno}
        meta.update(metadata or {})
        record = {"namespace": "", "time_ms": int(self.clock() * 1000), "event_type": event_type,
                  "key": key, "value": value, "metadata": meta}
        stream = self.stream or sys.stdout
        stream.write(":::MLLOG " + json.dumps(record) + "\n")
        stream.flush()

    def event(self, key, value=None, metadata=None):
        self._log(POINT_IN_TIME, key, value, metadata)

    def start(self, key, value=None, metadata=None):
        self._log(INTERVAL_START, key, value, metadata)

    def end(self, key, value=None, metadata=None):
        self._log(INTERVAL_END, key, value, metadata)


def parse_mllog(lines) -> list[dict]:
    """The records of the `:::MLLOG` lines among `lines`."""
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in lines if line.startswith(":::MLLOG ")]
