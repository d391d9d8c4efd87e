"""``clipalign train`` that, once it has logged step STOP, says so on stdout and waits to be killed.

    python tests/helpers/train_then_wait.py STOP TRAIN_ARGS...

Lets tests/test_resume_exact.py SIGKILL a run at an exact step (between two checkpoints, its
loader workers a few batches ahead) instead of racing it with a timer.
"""
import sys
import threading

from clipalign.cli import main
from clipalign.run_folder import RunWriter


def stop_after_logging(step: int) -> None:
    log = RunWriter.log

    def log_then_wait(self: RunWriter, record: dict) -> None:
        log(self, record)
        if record["step"] == step:
            print(f"logged step {step}", flush=True)
            threading.Event().wait()  # until the test kills the process

    RunWriter.log = log_then_wait


if __name__ == "__main__":
    stop_after_logging(int(sys.argv[1]))
    sys.exit(main(["train", *sys.argv[2:]]))
