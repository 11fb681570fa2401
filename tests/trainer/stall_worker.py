"""Run by test_faults.py as one of two ranks: rank 1 stops itself (SIGSTOP) at its third batch, as a hung rank does."""

import os
import signal
import sys

from mae_fast.data.torch_loader import TorchLoader
from mae_fast.pretrain import main

if __name__ == "__main__":
    real_epoch = TorchLoader.epoch

    def stalling_epoch(self, epoch, start=0):
        for index, batch in enumerate(real_epoch(self, epoch, start)):
            if os.environ["RANK"] == "1" and index == 2:
                os.kill(os.getpid(), signal.SIGSTOP)
            yield batch

    TorchLoader.epoch = stalling_epoch
    sys.exit(main(sys.argv[1:]))
