"""Imported first by the fork server of the figure workers (`figure_process`), so that it and every worker
forked from it end at once when they are done: an interpreter's teardown frees every module and object
matplotlib made, a tenth of a second that `analyze` waits for. By the time atexit runs, multiprocessing
has sent the last result and flushed the standard streams, so nothing is left to do."""

import atexit
import os

atexit.register(os._exit, 0)
