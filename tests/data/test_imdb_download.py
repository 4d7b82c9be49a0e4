"""IMDB sources: one-line errors for corrupt archives and offline downloads; a checked, cached download.

The network is never touched: urlopen is replaced, or the "download" reads a file:// URL.
"""

import hashlib
import tarfile
import urllib.error
import urllib.request

import pytest
from conftest import train_args, without_startup

import imdb_lora.data.imdb as imdb
from imdb_lora.cli import main
from imdb_lora.errors import UserError


def no_data_args(model, out):
    args = train_args(model, "unused", out)
    i = args.index("--data")
    return args[:i] + args[i + 2 :]


def only_line(err: str) -> str:
    lines = without_startup(err).splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("imdb-lora: error:") and "Traceback" not in err
    return lines[0]


@pytest.fixture
def archive(imdb_dir, tmp_path):
    path = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        tf.add(imdb_dir, arcname="aclImdb")
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No $IMDB_LORA_DATA, an empty cache, and every urlopen refused (the URLs asked are recorded)."""
    asked = []

    def refuse(url, *a, **k):
        asked.append(url)
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.delenv("IMDB_LORA_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return asked


@pytest.mark.parametrize("garbage", [b"garbage" * 100, b"\x1f\x8b\x08\x00" + b"\x00" * 300, b""])
def test_corrupt_archive_is_one_line(tiny_models, tmp_path, capsys, garbage):
    bad = tmp_path / "imdb.tar.gz"
    bad.write_bytes(garbage)
    model = tiny_models("bert")  # built first: its save progress is not the command's output
    capsys.readouterr()
    assert main(train_args(model, bad, tmp_path / "o")) == 2
    line = only_line(capsys.readouterr().err)
    assert f"cannot read archive {bad}" in line
    assert not (tmp_path / "o").exists()


def test_truncated_archive_is_one_line(archive, tiny_models, tmp_path, capsys):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    model = tiny_models("bert")  # built first: its save progress is not the command's output
    capsys.readouterr()
    assert main(train_args(model, cut, tmp_path / "o")) == 2
    assert "cannot read archive" in only_line(capsys.readouterr().err)


def test_offline_without_data_is_one_line_naming_the_url(offline, tiny_models, tmp_path, capsys):
    model = tiny_models("bert")  # built first: its save progress is not the command's output
    capsys.readouterr()
    assert main(no_data_args(model, tmp_path / "o")) == 2
    line = only_line(capsys.readouterr().err)
    assert offline == [imdb.IMDB_URL]
    assert imdb.IMDB_URL in line and "--data PATH" in line and "IMDB_LORA_DATA" in line
    assert not (tmp_path / "o").exists()
    assert not list((tmp_path / "cache").rglob("*.part"))  # nothing half-downloaded left behind


def test_download_is_checked_and_cached_once(archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(imdb, "IMDB_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    cache = tmp_path / "cache"
    got = imdb.download_imdb(cache, url=archive.as_uri())
    assert got == cache / "aclImdb_v1.tar.gz" and got.read_bytes() == archive.read_bytes()
    assert "download IMDB" in capsys.readouterr().err  # the progress bar
    assert len(imdb.load_imdb(got)["train"]) == 48

    def refuse(*a, **k):
        raise AssertionError("the cached copy must be used")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert imdb.download_imdb(cache, url=archive.as_uri()) == got


def test_download_with_a_wrong_checksum_keeps_nothing(archive, tmp_path):
    with pytest.raises(UserError, match="corrupt \\(sha256 mismatch\\)") as e:
        imdb.download_imdb(tmp_path / "cache", url=archive.as_uri())  # the real IMDB_SHA256
    assert len(str(e.value).splitlines()) == 1
    assert not list((tmp_path / "cache").iterdir())
