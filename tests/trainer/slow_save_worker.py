"""Run by test_faults.py: pretraining whose checkpoint writes take a minute, announced on stderr, so a test can
press Ctrl-C a second time while one is under way."""

import sys
import time

import mae_fast.trainer
from mae_fast.pretrain import main

if __name__ == "__main__":
    real_save = mae_fast.trainer.save_checkpoint

    def slow_save(state, path, *args, **kwargs):
        print(f"saving {path}", file=sys.stderr, flush=True)
        time.sleep(60)
        return real_save(state, path, *args, **kwargs)

    mae_fast.trainer.save_checkpoint = slow_save
    sys.exit(main(sys.argv[1:]))
