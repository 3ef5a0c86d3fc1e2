"""What `megatron-mom` prints: no claim of a plot it could not draw, no progress-bar carriage
returns in a redirected log, no Megatron import notices, honest MQAR presets."""
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mom.apps import mqar
from megatron_mom.apps.cli.main import QUIET_WARNINGS, main
from test_train import DOCS, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; "   # import matplotlib fails


def test_mqar_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit):
        main(["mqar", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for preset in mqar.PRESETS:
        assert f"{preset} (" in text, preset
    assert "chance level" in text


@pytest.mark.slow
def test_train_log_without_matplotlib_or_terminal(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(f"{doc} ({i})" for i in range(40) for doc in DOCS))
    out = tmp_path / "run"
    values = tiny_overrides(out, corpus, **{"train.steps": 2, "train.save_interval": 2,
                                            "train.eval_interval": 0, "train.log_interval": 1,
                                            "generate.max_new_tokens": 4})
    argv = ["train", "--output-dir", str(out)] + [
        arg for key, value in values.items() if key != "output_dir"
        for arg in ("--set", f"{key}={value}")]
    code = NO_MATPLOTLIB + f"from megatron_mom.apps.cli.main import main; sys.exit(main({argv!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)                # stdout is a pipe, not a tty
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss.png not drawn: matplotlib is not installed (pip install matplotlib" in \
        result.stdout
    assert not (out / "loss.png").exists()
    assert "\r" not in result.stdout and "step     2/2 | loss" in result.stdout
    for message in QUIET_WARNINGS:
        assert message not in result.stderr, result.stderr


def test_mqar_tiny_says_its_numbers_mean_nothing_and_what_it_wrote(megatron_single, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines = []
    mqar.run("tiny", str(tmp_path), overrides={"train_steps": 1, "test_examples": 8},
             mixers=["attention"], log=lines.append)
    assert lines[0] == mqar.TINY_NOTE and "chance level" in lines[0]
    assert lines[-1].endswith(mqar.TINY_NOTE)
    assert "mqar.png not drawn: matplotlib is not installed" in lines[-1]
    assert not (tmp_path / "mqar.png").exists() and (tmp_path / "results.md").exists()
