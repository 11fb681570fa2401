"""pipe: shards: a time limit for a command's first bytes and its silences, its exit status checked after a complete
tar, and a command that fails retried with backoff."""

import logging
import time

import pytest

import mae_fast.data.shards as shards
from mae_fast.data.shards import ShardReadError, load_shard_set, stream_images
from image_files import write_shards


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch):
    monkeypatch.setattr(shards, "RETRY_DELAYS", (0.0, 0.0))  # two retries, no backoff


def test_a_command_that_sends_nothing_is_stopped_after_the_timeout(tmp_path):
    began = time.monotonic()
    with pytest.raises(ShardReadError, match=r"sent nothing for 1 s \(--shard_timeout\).*3 attempts"):
        list(stream_images("pipe:sleep 60", timeout=1))
    assert time.monotonic() - began < 20


def test_a_command_that_goes_silent_mid_shard_is_stopped(tmp_path):
    (path,) = write_shards(tmp_path, [6])
    with pytest.raises(ShardReadError, match=r"went silent after 4096 bytes for 1 s \(--shard_timeout\)"):
        list(stream_images(f"pipe:head -c 4096 {path}; sleep 60", timeout=1))


def test_a_non_zero_exit_after_a_complete_tar_is_an_error(tmp_path):
    (path,) = write_shards(tmp_path, [3])
    assert len(list(stream_images(f"pipe:cat {path}"))) == 3
    with pytest.raises(ShardReadError, match="the command exited with status 3: upload incomplete"):
        list(stream_images(f"pipe:cat {path}; echo upload incomplete >&2; exit 3"))


def test_a_command_that_fails_once_is_retried_and_its_images_continue(tmp_path, caplog):
    (path,) = write_shards(tmp_path, [5])
    flag = tmp_path / "failed-once"
    # The first run sends two images' worth and fails; the second sends the whole shard.
    command = f"pipe:if [ -e {flag} ]; then cat {path}; else touch {flag}; head -c 5000 {path}; exit 1; fi"
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        images = list(stream_images(command))
    assert [im.key for im in images] == [f"s{i:06d}" for i in range(5)]  # each image once, in order
    assert "retrying" in caplog.text and "status 1" in caplog.text


def test_counting_a_command_that_keeps_failing_is_one_error(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("pipe:echo no credentials >&2; exit 1\n")
    with pytest.raises(ShardReadError, match="no credentials"):
        load_shard_set(str(listing), timeout=5)
