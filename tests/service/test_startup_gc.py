"""The collector is paused while `shira serve` starts and resumed, with start-up's objects frozen, once it is up."""

from __future__ import annotations

import gc

from service.startup import pause_gc, resume_gc


def test_resume_freezes_what_startup_made_and_collects_again():
    try:
        pause_gc()
        assert not gc.isenabled()
        made = [[i] for i in range(1000)]  # objects start-up keeps
        resume_gc()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(made)
    finally:
        gc.unfreeze()
        gc.enable()


def test_resume_without_a_pause_changes_nothing():
    assert gc.isenabled()
    resume_gc()
    assert gc.isenabled() and gc.get_freeze_count() == 0
