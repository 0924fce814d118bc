"""How the trainer child tells the daemon what happened (its exit status). No torch here: the daemon reads it."""

DONE = 0
FAILED = 1  # an unexpected error: retried up to limits.max_attempts
BAD_INPUT = 3  # invalid data or divergence: retrying cannot help
OUT_OF_MEMORY = 4  # retried with half the micro-batch and twice the accumulation
DISK_FULL = 5  # the job goes back to pending and the daemon waits for space
STOPPED = 75  # warm stop: checkpointed, back to pending (EX_TEMPFAIL)
DAEMON_GONE = 70  # the lifeline pipe closed: the daemon died, so the trainer exits unsupervised work

NAMES = {DONE: "done", FAILED: "failed", BAD_INPUT: "bad input", OUT_OF_MEMORY: "out of memory",
         DISK_FULL: "disk full", STOPPED: "stopped", DAEMON_GONE: "daemon gone"}
