"""Stopping a child process the way a back-end expects to be stopped."""

import subprocess


def stop(proc, grace=10):
    """SIGTERM (a back-end's clean exit), then SIGKILL after grace seconds;
    the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
