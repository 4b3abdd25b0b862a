"""A short trial on a small set (`train make-synthetic --n 8`): one example is held out for validation when the rest
still fill a global batch (else a one-line warning says val_loss stays blank), and the learning-rate warm-up is
capped to a tenth of the run, with a warning."""
import csv
import logging
import os

import pytest


@pytest.mark.parametrize("n, fraction, batch, want, warned", [
    (8, 0.05, 4, 1, False),    # round(0.4) = 0: one is set aside, 7 still fill a batch of 4
    (12, 0.2, 4, 2, False),    # enough for the fraction: unchanged
    (4, 0.05, 4, 0, True),     # none can be spared: warned
    (8, 0.0, 4, 0, True),      # asked for none: warned
])
def test_held_out(caplog, n, fraction, batch, want, warned):
    from ipadapter_instruct.train.loop import held_out
    with caplog.at_level(logging.WARNING, logger="ipadapter_instruct.train.loop"):
        assert held_out(n, fraction, batch) == want
    lines = [r.getMessage() for r in caplog.records if "no validation examples" in r.getMessage()]
    assert len(lines) == int(warned) and all("\n" not in ln for ln in lines)


def test_warmup_is_capped_to_the_run(caplog):
    from ipadapter_instruct.train.loop import capped_warmup
    with caplog.at_level(logging.WARNING, logger="ipadapter_instruct.train.loop"):
        assert capped_warmup(100, 1000) == 100 and not caplog.records
        assert capped_warmup(100, 20) == 2
        assert capped_warmup(100, 5) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "warm-up capped to 2 of 20 steps (--warmup-steps 100 is longer than a tenth of the run)",
        "warm-up capped to 1 of 5 steps (--warmup-steps 100 is longer than a tenth of the run)"]


def test_make_synthetic_8_validates(tiny, tmp_path, caplog):
    from ipadapter_instruct.train.__main__ import main
    assert main(["make-synthetic", str(tmp_path / "data"), "--n", "8"]) == 0
    manifest = next(os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "data") for f in fs if f.endswith(".jsonl"))
    with caplog.at_level(logging.WARNING):
        assert main(["--model", tiny["model"], "--image-encoder", tiny["image_encoder"], "--data", manifest,
                     "--out", str(tmp_path / "run"), "--resolution", "32", "--steps", "2", "--save-every", "2",
                     "--no-progress", "--device", "cpu"]) == 0
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and rows[-1]["val_loss"], rows
    assert "warm-up capped to 1 of 2 steps" in caplog.text
