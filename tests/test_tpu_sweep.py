"""The batch-size sweep's selection, table and plot (no training here: the
sweep itself is not part of CI)."""

import math
import os

import pytest

from tpu_scripts.resnet import sweep_batch_size as sweep


def fake_runs():
    runs = []
    for optimizer in ("lars", "momentum"):
        for batch in (128, 8192):
            for multiplier, val in ((0.3333, 0.5), (1.0, 0.8), (3.0, 0.7)):
                runs.append(dict(
                    optimizer=optimizer, batch_size=str(batch),
                    lr_multiplier=str(multiplier),
                    peak_lr=str(sweep.rate_centre(optimizer, batch)
                                * multiplier),
                    val_accuracy=str(val if batch == 128 else val / 2),
                    test_accuracy=str(val - 0.01), train_loss="0.5",
                    steps=str(60000 // batch), seconds="1.0"))
    runs[-1]["val_accuracy"] = "nan"  # a diverged run is never picked
    return runs


def test_rate_rules():
    assert sweep.rate_centre("lars", 8192) == 10.0
    assert sweep.rate_centre("lamb", 2048) == pytest.approx(5e-3)
    assert sweep.rate_centre("momentum", 512) == pytest.approx(0.2)
    assert sweep.rate_centre("nesterov", 1024) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
        sweep.rate_centre("adam", 128)


def test_best_by_validation_then_table_and_plot(tmp_path):
    best = sweep.best_rows(fake_runs())
    assert set(best) == {("lars", 128), ("lars", 8192), ("momentum", 128),
                         ("momentum", 8192)}
    assert all(float(r["lr_multiplier"]) == 1.0 for r in best.values())
    table = sweep.write_tables(best, str(tmp_path), "protocol text",
                               "python tpu_scripts/resnet/sweep_batch_size.py", 60,
                               multipliers=[0.3333, 1.0, 3.0])
    assert "| 128 | 468 | 79.00 (1.25) | 79.00 (0.05) |" in table
    assert "python tpu_scripts/resnet/sweep_batch_size.py" in table
    assert (tmp_path / "table.csv").read_text().count("\n") == 5
    best[("lars", 128)]["lr_multiplier"] = "3.0"  # the grid's top end
    table = sweep.write_tables(best, str(tmp_path), "", "", 60,
                               multipliers=[0.3333, 1.0, 3.0])
    assert "| 128 | 468 | 79.00 (1.25*) | 79.00 (0.05) |" in table
    pytest.importorskip("matplotlib")
    path = sweep.write_plot(best, str(tmp_path), "title")
    assert os.path.getsize(path) > 1000
    assert not math.isnan(float(best[("momentum", 8192)]["val_accuracy"]))
