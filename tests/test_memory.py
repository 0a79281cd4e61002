"""The memory budget of a streamed prune: sizes parse, the batch shrinks to fit, and a budget that
cannot hold one block is refused before any pruning, with one line and exit 2."""

from __future__ import annotations

import pytest

from prunekit.cli import main
from prunekit.errors import UserInputError
from prunekit.memory import calibration_batch, machine_bytes, parse_size, streamed_prune_memory
from tests.conftest import make_tiny


@pytest.mark.parametrize("text,expected", [("8GB", 8e9), ("7.5g", 7.5e9), ("800MiB", 800 * 2**20), ("3e9", 3e9)])
def test_sizes_parse(text, expected):
    assert parse_size(text) == int(expected)


@pytest.mark.parametrize("text", ["", "8 potatoes", "-1GB", "0"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(UserInputError, match="--max-memory"):
        parse_size(text)


def test_machine_memory_reads_the_cgroup_limit_when_lower(tmp_path):
    meminfo, limit = tmp_path / "meminfo", tmp_path / "memory.max"
    meminfo.write_text("MemTotal:       24000000 kB\n")
    limit.write_text("8000000000\n")
    assert machine_bytes(meminfo, limit) == 8_000_000_000
    limit.write_text("max\n")
    assert machine_bytes(meminfo, limit) == 24_000_000 * 1024


def _qwen15b_like():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2)


def test_a_smaller_budget_takes_a_smaller_batch_and_never_less_than_it_needs():
    config = _qwen15b_like()
    big, need_big = calibration_batch(config, "fasp", 32, 512, int(24e9))
    small, need_small = calibration_batch(config, "fasp", 32, 512, int(need_big.total) - 1)
    assert big == 8 and small < big and need_small.total < need_big.total
    assert streamed_prune_memory(config, "fasp", 32, 512, 1).statistics > \
        streamed_prune_memory(config, "wanda", 32, 512, 1).statistics


def test_a_budget_below_one_block_is_refused_before_pruning(tokenizer, tmp_path, capsys):
    source = tmp_path / "dense"
    make_tiny("qwen2").save_pretrained(source)
    tokenizer.save_pretrained(source)
    calib = tmp_path / "calib.txt"
    calib.write_text("text for calibration " * 400)
    capsys.readouterr()  # the set-up's own progress output
    code = main(["prune", "--model", str(source), "--method", "wanda", "--calib", str(calib),
                 "--max-memory", "100MB", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: a streamed prune of this model needs about")
    assert not (tmp_path / "out").exists()
