"""The suite's last line against a hang (a pytest plugin, loaded by
conftest.py).

pytest-timeout's signal method fails a test that spins, and the run goes
on; it cannot interrupt a test idle in uvloop (libuv retries epoll_wait on
EINTR, so no Python runs to take the alarm), and one such hang held CI
until its own limit. Past the test limit and HANG_MARGIN_S, faulthandler (a
C watchdog thread) dumps every thread's stack to the run's stderr and ends
the run: a failing run, never a hanging one."""

from __future__ import annotations

import faulthandler
import os

import pytest

HANG_MARGIN_S = int(os.environ.get("ANBAO_HANG_MARGIN_S", "60"))


def _real_stderr(config):
    """The run's own stderr, not the test's captured one (fd 2 is
    redirected while a test runs): where the hang's stacks must go."""
    capture = config.pluginmanager.getplugin("capturemanager")
    saved = getattr(getattr(getattr(capture, "_global_capturing", None), "err", None), "targetfd_save", None)
    return os.fdopen(os.dup(saved if saved is not None else 2), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit_s = float(item.config.getini("timeout") or 0)
    if limit_s > 0:
        if not hasattr(item.config, "_hang_out"):
            item.config._hang_out = _real_stderr(item.config)
        faulthandler.dump_traceback_later(limit_s + HANG_MARGIN_S, exit=True, file=item.config._hang_out)
    try:
        yield
    finally:
        if limit_s > 0:
            faulthandler.cancel_dump_traceback_later()
