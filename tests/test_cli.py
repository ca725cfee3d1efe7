"""The ``t2t-fast`` command: help of every subcommand, info, exit codes, ``python -m t2t_fast``."""
import shutil
import subprocess
import sys

import pytest

from t2t_fast.cli import main


@pytest.mark.parametrize("command, expected", [
    ("train", ["--data", "--model", "--img-size", "--batch-size", "--epochs", "--lr", "--weight-decay",
               "--warmup-epochs", "--warmup-lr", "--min-lr", "--cooldown-epochs", "--drop-path", "--model-ema",
               "--no-model-ema", "--model-ema-decay", "--clip-grad", "--accum-steps", "--seed", "--workers",
               "--output", "--resume", "--precision", "--no-fused", "--grad-checkpoint", "--channels-last",
               "--aa", "--reprob", "--mixup", "--cutmix", "--smoothing", "--save-every", "--deterministic",
               "--max-bad-steps", "--dataset"]),
    ("finetune", ["--checkpoint", "--dataset", "--backbone-lr-scale", "--opt"]),
    ("info", []),
])
def test_help_of_each_command(command, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: t2t-fast {command}")
    for flag in expected:
        assert flag in out, flag


def test_top_level_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "finetune" in out and "info" in out and "torchrun" in out
    assert main([]) == 2


def test_help_shows_recipe_and_preset_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default t2t_vit_14; builtin preset t2t_vit_7" in out
    assert "default 0.99996" in out and "rand-m9-mstd0.5-inc1" in out


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "t2t-fast" in out
    for name in ("triton", "cuda", "cpu", "reference"):
        assert f"  {name} " in out


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "nowhere" in err and "not a directory" in err
    assert main(["finetune", "--output", str(tmp_path / "ft")]) == 2  # no weights to start from
    err = capsys.readouterr().err
    assert "--checkpoint PATH or --pretrained" in err and not (tmp_path / "ft").exists()


def test_python_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "t2t_fast", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "usage: t2t-fast train" in proc.stdout


@pytest.mark.skipif(shutil.which("t2t-fast") is None, reason="the console script is not installed")
def test_console_script():
    proc = subprocess.run(["t2t-fast", "finetune", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: t2t-fast finetune" in proc.stdout


def test_start_up_errors_exit_2_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--model", "no_such_model", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("t2t-fast train: error: --model 'no_such_model' is not a model here") and not out.exists()
    assert main(["train", "--resume", str(tmp_path / "missing.pth")]) == 2
    captured = capsys.readouterr()
    assert "no checkpoint file" in captured.err and captured.out == ""  # no banner before the error


def test_an_error_deep_in_training_keeps_its_traceback(tmp_path, monkeypatch):
    """Only bad input (ConfigError) is 'error + exit 2'; a ValueError inside training is a bug and propagates."""
    from t2t_fast.train import engine

    def broken_fit(self):
        raise ValueError("a bug inside the training loop")

    monkeypatch.setattr(engine.Trainer, "fit", broken_fit)
    with pytest.raises(ValueError, match="a bug inside the training loop"):
        main(["train", "--train-samples", "16", "--val-samples", "8", "-b", "8", "--epochs", "1", "--output",
              str(tmp_path / "out")])
    assert not (tmp_path / "out" / "run.lock").exists()  # the lock is released on the way out
