"""The scheduling options of the training command line, refused before anything starts."""

from __future__ import annotations

import pytest

from flows.train_flow import main


def test_cron_without_serve_is_refused():
    with pytest.raises(SystemExit, match="--cron schedules the deployment made by --serve"):
        main(["--cron", "0 3 * * *"])


def test_compare_cli_refuses_a_negative_margin():
    from flows.compare_flow import main as compare_main

    with pytest.raises(SystemExit, match="--promote_margin"):
        compare_main(["--promote_margin", "-0.1"])
