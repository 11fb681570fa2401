"""Run by the tests under torchrun: ``mae_fast.pretrain`` with torch.compile's backend set to aot_eager (the same
tracing of forward and backward as the default backend, without minutes of CPU code generation)."""

import functools
import sys

import torch

if __name__ == "__main__":
    torch.compile = functools.partial(torch.compile, backend="aot_eager")
    from mae_fast.pretrain import main

    sys.exit(main(sys.argv[1:]))
