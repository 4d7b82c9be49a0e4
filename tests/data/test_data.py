import codecs
import json
import random
import re
import tarfile

import pytest
from conftest import FILLER, NEG_WORDS, POS_WORDS, ROBERTA_BASE, needs_shared, write_imdb

from imdb_lora.config import DataConfig
from imdb_lora.data.files import load_labeled_file, read_texts
from imdb_lora.data.imdb import load_imdb, resolve_imdb_source
from imdb_lora.data.splits import load_splits, stratified_split, stratified_subset
from imdb_lora.data.tokenize import encode
from imdb_lora.errors import UserError

WORDS = sorted(set(POS_WORDS + NEG_WORDS + FILLER))


def make_tar(src_root, dest, mode):
    with tarfile.open(dest, mode) as tf:
        tf.add(src_root, arcname="aclImdb")
    return dest


@pytest.mark.parametrize("suffix, mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tar.xz", "w:xz")])
def test_archives_read_directly_and_equal_the_folder(imdb_dir, tmp_path, suffix, mode):
    from_dir = load_imdb(imdb_dir)
    from_tar = load_imdb(make_tar(imdb_dir, tmp_path / f"imdb{suffix}", mode))
    for split in ("train", "test"):
        assert from_tar[split].texts == from_dir[split].texts
        assert from_tar[split].labels == from_dir[split].labels
    assert not (tmp_path / "aclImdb").exists()  # nothing unpacked to disk


def test_labels_follow_the_folders(imdb_dir):
    d = load_imdb(imdb_dir.parent)  # the parent of aclImdb works too
    assert set(d["train"].labels) == {0, 1}
    pos = (imdb_dir / "train" / "pos" / "0_8.txt").read_text()
    assert d["train"].labels[d["train"].texts.index(pos)] == 1


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_imdb(tmp_path / "nope")


def test_corrupt_archive(tmp_path):
    bad = tmp_path / "imdb.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip" * 50)
    with pytest.raises(UserError, match="cannot read archive"):
        load_imdb(bad)


def test_archive_that_is_not_aclimdb(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("hello")
    with pytest.raises(UserError, match="not an aclImdb dataset"):
        load_imdb(make_tar(tmp_path / "stuff", tmp_path / "x.tar", "w"))


def test_empty_review_file_is_named(tmp_path):
    root = write_imdb(tmp_path, per_class=3)
    (root / "train" / "neg" / "1_2.txt").write_text("  \n")
    with pytest.raises(UserError, match=r"empty: .*train/neg/1_2\.txt"):
        load_imdb(root)


def test_non_utf8_review_file_is_named(tmp_path):
    root = write_imdb(tmp_path, per_class=3)
    (root / "test" / "pos" / "2_8.txt").write_bytes(b"caf\xe9 \xff great")
    with pytest.raises(UserError, match=r"not UTF-8: .*test/pos/2_8\.txt"):
        load_imdb(make_tar(root, tmp_path / "x.tar.gz", "w:gz"))


def test_oversized_review_in_an_archive_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import io

    import imdb_lora.data.imdb as imdb

    monkeypatch.setattr(imdb, "MAX_REVIEW_BYTES", 1000)
    root = write_imdb(tmp_path, per_class=3)
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz") as tf:
        tf.add(root, arcname="aclImdb")
        big = tarfile.TarInfo("aclImdb/train/pos/9_9.txt")
        big.size = 5000
        tf.addfile(big, io.BytesIO(b"a" * 5000))
    opened = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tf, m: opened.append(m.name) or extract(tf, m))
    with pytest.raises(UserError, match=r"larger than .*train/pos/9_9\.txt \(5,000 bytes\)"):
        load_imdb(tmp_path / "bomb.tar.gz")
    assert opened and "aclImdb/train/pos/9_9.txt" not in opened  # refused from its header, never read


def test_archive_expanding_past_the_bound_is_refused(tmp_path, monkeypatch):
    import imdb_lora.data.imdb as imdb

    root = write_imdb(tmp_path, per_class=3)
    archive = make_tar(root, tmp_path / "x.tar.xz", "w:xz")
    total = sum(f.stat().st_size for f in root.rglob("*.txt"))
    monkeypatch.setattr(imdb, "MAX_EXPANDED_BYTES", total // 2)
    with pytest.raises(UserError, match="expands to more than"):
        load_imdb(archive)
    monkeypatch.setattr(imdb, "MAX_EXPANDED_BYTES", total)
    monkeypatch.setattr(imdb, "MAX_ENTRIES", 5)
    with pytest.raises(UserError, match="more than 5 entries"):
        load_imdb(archive)
    with pytest.raises(UserError, match="more than 5 review files"):
        load_imdb(root)


def test_oversized_or_special_review_file_in_a_folder_is_refused(tmp_path, monkeypatch):
    import imdb_lora.data.imdb as imdb

    monkeypatch.setattr(imdb, "MAX_REVIEW_BYTES", 1000)
    root = write_imdb(tmp_path, per_class=3)
    (root / "train" / "pos" / "9_9.txt").write_text("a" * 1001)
    with pytest.raises(UserError, match=r"larger than .*9_9\.txt"):
        load_imdb(root)
    (root / "train" / "pos" / "9_9.txt").unlink()
    (root / "train" / "pos" / "9_9.txt").symlink_to("/dev/zero")
    with pytest.raises(UserError, match=r"not a regular file: .*9_9\.txt"):
        load_imdb(root)


def _tar_with(root, dest, extra: tarfile.TarInfo, data: bytes = b"") -> str:
    import io

    with tarfile.open(dest, "w") as tf:
        tf.add(root, arcname="aclImdb")
        extra.size = len(data)
        tf.addfile(extra, io.BytesIO(data) if data else None)
    return str(dest)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    return m


@pytest.mark.parametrize(
    "member, data, error",
    [
        # skipped without a word: the split silently had one review fewer
        (_member("aclImdb/train/pos/9_9.txt", tarfile.SYMTYPE, "/etc/hostname"), b"", "is a symbolic link"),
        (
            _member("aclImdb/train/neg/9_1.txt", tarfile.LNKTYPE, "aclImdb/train/pos/0_8.txt"),
            b"",
            "hard link",
        ),
        # read twice: the review counted twice (tar keeps only the last copy when it extracts)
        (_member("aclImdb/train/pos/0_8.txt"), b"a second copy", "holds aclImdb/train/pos/0_8.txt twice"),
        # read as reviews though outside any aclImdb folder (tar refuses to extract them)
        (_member("../x/train/pos/9_9.txt"), b"great", r"member \.\./x/train/pos/9_9.txt has a '\.\.'"),
        (_member("aclImdb/../test/neg/9_1.txt"), b"awful", "has a '..' in its name"),
        (_member("/srv/train/neg/9_1.txt"), b"awful", "member /srv/train/neg/9_1.txt has an absolute name"),
    ],
)
def test_archive_review_members_that_are_links_repeated_or_outside_the_archive_are_refused(
    tmp_path, member, data, error
):
    archive = _tar_with(write_imdb(tmp_path, per_class=3), tmp_path / "x.tar", member, data)
    with pytest.raises(UserError, match=f"^--data: archive .*x.tar.* {error}"):
        load_imdb(archive)


def test_review_errors_name_the_flag_and_the_archive(tmp_path):
    root = write_imdb(tmp_path, per_class=3)
    archive = _tar_with(root, tmp_path / "x.tar", _member("aclImdb/test/pos/9_9.txt"), b"caf\xe9")
    # the member's name alone did not say which file, nor which flag gave it
    with pytest.raises(
        UserError, match=r"^--data: review file is not UTF-8: aclImdb/test/pos/9_9.txt in .*x\.tar "
    ):
        load_imdb(archive)
    (root / "train" / "pos" / "0_8.txt").write_text("")
    with pytest.raises(UserError, match="^--data: review file is empty: "):
        load_imdb(root)


def test_a_review_file_with_a_byte_order_mark_reads_without_it(tmp_path):
    root = write_imdb(tmp_path, per_class=3)
    (root / "train" / "pos" / "0_8.txt").write_bytes(b"\xef\xbb\xbfgreat film")
    assert "great film" in load_imdb(root)["train"].texts


def test_a_fifo_as_data_is_refused_instead_of_blocking(tmp_path):
    import os
    import threading

    fifo = tmp_path / "imdb.tar"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_imdb(fifo)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            outcome.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # blocked opening the FIFO (the old behaviour): a writer's open releases it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("load_imdb blocked on a FIFO")
    assert isinstance(outcome[0], UserError) and "not a regular file or a folder" in str(outcome[0])


def test_data_errors_name_the_environment_variable_when_it_gave_the_path(monkeypatch, tmp_path):
    bad = tmp_path / "imdb.tar.gz"
    bad.write_bytes(b"not an archive")
    monkeypatch.setenv("IMDB_LORA_DATA", str(bad))
    with pytest.raises(UserError, match=r"^\$IMDB_LORA_DATA: cannot read archive "):
        load_splits(DataConfig(), seed=0)


def test_data_env_default(monkeypatch, imdb_dir):
    monkeypatch.setenv("IMDB_LORA_DATA", str(imdb_dir))
    assert resolve_imdb_source(None) == (str(imdb_dir), "$IMDB_LORA_DATA")
    assert resolve_imdb_source("given") == ("given", "--data")


def test_download_fails_cleanly_without_network(monkeypatch, tmp_path):
    import urllib.request

    def refuse(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.delenv("IMDB_LORA_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(UserError, match="could not be downloaded.*--data PATH"):
        resolve_imdb_source(None)
    assert not list(tmp_path.rglob("*.part"))


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_labeled_files(tmp_path, ext):
    rows = [("good, fun", 1), ("bad", 0), ('so "so"', 0)]
    p = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        p.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    else:
        import csv

        with p.open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if ext == "tsv" else ",")
            w.writerow(["label", "text"])
            w.writerows([(y, t) for t, y in rows])
    d = load_labeled_file(p)
    assert d.texts == [t for t, _ in rows] and d.labels == [y for _, y in rows]


def test_labeled_file_missing_column(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("review,label\nfine,1\n")
    with pytest.raises(UserError, match=r"lacks column\(s\) \['text'\]"):
        load_labeled_file(p)


def test_labeled_file_of_one_unlabeled_line_names_the_missing_columns(tmp_path):
    # a one-line text file given to evaluate --file: its line is the CSV header, and no row follows;
    # it said "has no rows", not that the file is not labeled
    p = tmp_path / "d.txt"
    p.write_text("a single review, no header\n")
    with pytest.raises(UserError, match=r"lacks column\(s\) \['text', 'label'\]"):
        load_labeled_file(p)
    p.write_text("text,label\n")  # the columns are there: no rows is the fault
    with pytest.raises(UserError, match="has no rows"):
        load_labeled_file(p)


@pytest.mark.parametrize("label", ["2", "-1", "maybe", "positiv", ""])  # pos/neg are spellings
def test_labeled_file_bad_label(tmp_path, label):
    p = tmp_path / "d.csv"
    p.write_text(f"text,label\nfine,1\nmeh,{label}\n")
    with pytest.raises(UserError, match="line 3 has label"):
        load_labeled_file(p)


def test_labeled_file_without_a_label_says_so(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine", "label": 1}\n{"text": "meh"}\n')
    with pytest.raises(UserError, match="line 2 has no 'label' value"):  # it said "has label None"
        load_labeled_file(p)


def test_labeled_file_messages_name_the_line_an_editor_shows(tmp_path):
    """A CSV's header is line 1 and a quoted cell may span lines; a JSONL file may have blank lines:
    each row's line is where it starts, the number an editor (or a spreadsheet) shows."""
    c = tmp_path / "d.csv"
    c.write_text('text,label\n"two\nlines",1\n"three\r\nline\ncell",0\nok,1\nbad,7\n')
    with pytest.raises(UserError, match="d.csv line 8 has label '7'"):
        load_labeled_file(c)
    c.write_text('text,label\n"two\nlines",1\n\n"three\r\nline\ncell",0\nok,1\n')
    assert load_labeled_file(c).lines == [2, 5, 8]  # the blank line 4 is no row
    j = tmp_path / "d.jsonl"
    j.write_text('\n{"text": "a", "label": 1}\n\n\n{"text": "b", "label": 1}\n{"text": "c", "label": "x"}\n')
    with pytest.raises(UserError, match="d.jsonl line 6 has label 'x'"):
        load_labeled_file(j)
    j.write_text('\n{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    data = load_labeled_file(j)
    assert data.lines == [2, 4] and data.take([1]).lines == [4]


def test_a_labeled_file_given_as_data_points_to_the_right_flags(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nfine,1\n")
    with pytest.raises(UserError, match="--data takes an aclImdb folder or archive: .* --train-file"):
        load_imdb(p)


@pytest.mark.parametrize(
    "name, content, texts",
    [
        # a byte order mark (Excel's "CSV UTF-8", Notepad) was read into the first column's name or text
        ("bom.csv", b"\xef\xbb\xbftext,label\ngreat,1\nawful,0\n", ["great", "awful"]),
        ("bom.jsonl", b'\xef\xbb\xbf{"text": "great", "label": 1}\n', ["great"]),
        ("crlf.csv", b"text,label\r\ngreat,1\r\nawful,0\r\n", ["great", "awful"]),
        ("crlf.jsonl", b'{"text": "great", "label": 1}\r\n', ["great"]),
        ("trailing.csv", b"text,label\ngreat,1,\n", ["great"]),  # an empty cell past the header loses nothing
        ("bom.txt", b"\xef\xbb\xbfgreat\nawful\n", ["great", "awful"]),
        # UTF-16 with its byte order mark: Excel's "Unicode Text" (tab-separated), PowerShell 5's `>`;
        # it was "not UTF-8 (byte 0xff on line 1)"
        ("u16.tsv", "text\tlabel\r\ngreat\t1\r\nawful\t0\r\n".encode("utf-16"), ["great", "awful"]),
        ("u16be.csv", "text,label\ngreat,1\n".encode("utf-16-be").join([b"\xfe\xff", b""]), ["great"]),
        ("u16.jsonl", '{"text": "caf\u00e9", "label": 1}\r\n'.encode("utf-16"), ["caf\u00e9"]),
        ("u16.txt", "great\r\nawful\r\n".encode("utf-16"), ["great", "awful"]),
        # lone CR line ends (Excel for Mac's "CSV (Macintosh)"): csv refused the file as one line, "line 0"
        ("mac.csv", b"text,label\rgreat,1\rawful,0\r", ["great", "awful"]),
        # another name for JSON Lines (score takes it): predict read its lines as texts, braces and all
        ("d.ndjson", b'{"text": "great", "label": 1}\n', ["great"]),
    ],
)
def test_labeled_and_text_files_read_alike_whatever_their_line_ends_or_byte_order_mark(
    tmp_path, name, content, texts
):
    p = tmp_path / name
    p.write_bytes(content)
    if p.suffix != ".txt":  # one text per line: predict's only
        assert load_labeled_file(p, "--file").texts == texts
    assert read_texts(str(p), None)[0] == texts


@pytest.mark.parametrize(
    "name, content, error",
    [
        # the last 'text' column was read without a word
        ("dup.csv", b"text,label,text\ngreat,1,awful\n", r"names column\(s\) \['text'\] more than once"),
        # json keeps the last of two keys without a word
        ("dup.jsonl", b'{"text": "great", "label": 1, "text": "awful"}\n', "line 1 has the key 'text' more"),
        # an unquoted comma cut the text there, the rest dropped without a word
        ("cut.csv", b"label,text\n1,great, really great\n", "line 2 has 3 cells and the header 2; quote"),
        # csv closed the stray quote's cell at the end of the file: three rows read as one text
        (
            "open.csv",
            b'label,text\n1,great\n1,"bad\n0,good\n1,fine\n',
            "line 3 opens a quoted cell that is never",
        ),
        ("array.json", b'[{"text": "great", "label": 1}]\n', "not a JSON object; JSON Lines is one object"),
        ("gz.jsonl", b"\x1f\x8b\x08\x00rest of a gzip stream", "is gzip-compressed, not text"),
        ("p.csv", b"PAR1\x15\x04 rest of a Parquet file", "is a Parquet file, not text"),
        ("bad.csv", b"text,label\ngreat,1\ncaf\xe9,0\n", r"is not UTF-8 \(byte 0xe9 on line 3\)"),
        # JSON written over several lines, a .json file's array or `jq .`'s output: "Expecting value"
        ("pretty.json", b'[\n  {"text": "great", "label": 1}\n]\n', r"line 1 is not JSON .*not a JSON array"),
        (
            "jq.jsonl",
            b'{\n  "text": "great",\n  "label": 1\n}\n',
            "line 1 is not JSON .*not one object over several",
        ),
        (
            "comma.jsonl",
            b'{"text": "great", "label": 1},\n',
            r"line 1 is not JSON \(Extra data at column 30\)",
        ),
        # it said: lacks column(s) ['text', 'label'] (columns found: [])
        ("empty.csv", b"", "is empty$"),
        ("blank.csv", b"\ntext,label\ngreat,1\n", "line 1, the header, is blank$"),
        (
            "bad16.csv",
            codecs.BOM_UTF16_LE + "text,label\n".encode("utf-16-le") + b"\x00\xdc",
            "is not UTF-16",
        ),
    ],
)
def test_labeled_and_text_files_that_would_be_misread_are_refused_in_one_line(tmp_path, name, content, error):
    p = tmp_path / name
    p.write_bytes(content)
    for read in (lambda: load_labeled_file(p, "--file"), lambda: read_texts(str(p), None)):
        with pytest.raises(UserError, match=f"^--file: .*{name} .*{error}"):
            read()


def test_mac_line_ends_keep_rows_on_the_lines_an_editor_shows(tmp_path):
    c = tmp_path / "d.csv"
    c.write_bytes(b'text,label\r"two\rlines",1\rok,0\rbad,7\r')
    with pytest.raises(UserError, match="d.csv line 5 has label '7'"):
        load_labeled_file(c)
    c.write_bytes(b'text,label\r"two\rlines",1\rok,0\r')
    data = load_labeled_file(c)
    assert data.texts == ["two\rlines", "ok"] and data.lines == [2, 4]


@pytest.mark.parametrize(
    "name, header, columns, hint",
    [
        (
            "d.csv",
            "Text, Label",
            "['Text', ' Label']",
            r"in another case or with spaces around: \['Text'",
        ),
        # Excel in a locale whose decimal point is a comma separates columns with ';'
        (
            "d.csv",
            "text;label",
            "['text;label']",
            "its header is one column holding ';': columns are separated by ','",
        ),
        (
            "d.csv",
            "text\tlabel",
            r"['text\tlabel']",
            "its header is one column holding tabs: .* when named .tsv",
        ),
        (
            "d.tsv",
            "text,label",
            "['text,label']",
            r"its header is one column holding ',': columns are separated by '\\t'",
        ),
    ],
)
def test_a_missing_column_says_what_the_header_holds_instead(tmp_path, name, header, columns, hint):
    p = tmp_path / name
    p.write_text(f"{header}\nfine,1\n")
    with pytest.raises(
        UserError, match=rf"lacks column\(s\) .*\(columns found: {re.escape(columns)}\); {hint}"
    ):
        load_labeled_file(p)
    with pytest.raises(UserError, match=rf"lacks column\(s\) \['text'\]; it needs 'text' .*; {hint}"):
        read_texts(str(p), None)


def test_a_json_label_is_shown_as_json(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine", "label": true}\n')
    with pytest.raises(UserError, match="line 1 has label true; labels must be"):  # was "True"
        load_labeled_file(p)


def test_a_labeled_text_that_is_no_string_is_named_as_such(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": 5, "label": 1}\n')
    with pytest.raises(
        UserError, match="line 1 has a JSON int as its text, not a string"
    ):  # "empty or missing"
        load_labeled_file(p)
    c = tmp_path / "d.csv"
    c.write_text("label,text\n1\n")
    with pytest.raises(UserError, match="line 2 has no 'text' value"):  # was "text 1 is empty"
        read_texts(str(c), None)


def test_a_pipe_is_read_as_a_file(tmp_path):
    import os
    import threading

    fifo = tmp_path / "in.csv"  # what `--file <(zcat in.csv.gz)` hands over: it was "no such file"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "wb") as f:
            f.write(b"text,label\ngreat,1\n")

    threading.Thread(target=write, daemon=True).start()
    assert load_labeled_file(fifo).texts == ["great"]
    with pytest.raises(UserError, match="is not a file"):
        load_labeled_file(tmp_path)


def test_stratified_split_is_seeded_and_balanced():
    labels = [0] * 60 + [1] * 40
    rest, held = stratified_split(labels, 0.1, seed=3)
    assert sorted(rest + held) == list(range(100))
    assert sum(labels[i] for i in held) == 4 and len(held) == 10
    assert stratified_split(labels, 0.1, seed=3) == (rest, held)
    assert stratified_split(labels, 0.1, seed=4) != (rest, held)


def test_stratified_subset_exact_size():
    labels = [0, 1] * 50 + [1]
    idx = stratified_subset(labels, 11, seed=0)
    assert len(idx) == 11 and len(set(idx)) == 11
    assert stratified_subset(labels, None, 0) == list(range(101))


def test_splits_never_overlap(imdb_dir):
    cfg = DataConfig(path=str(imdb_dir), val_size=0.25, max_eval_samples=10)
    s = load_splits(cfg, seed=1)
    assert not set(s.train.texts) & set(s.val.texts)
    assert len(s.val) == 10 and len(s.test) == 10 and len(s.train) == 36
    # what the subsets were taken from, for the model card ("10 of the 12 validation reviews")
    assert s.available == {"train": 36, "val": 12, "test": 48}


def test_validation_comes_from_train_and_test_is_imdbs_own_test_split(imdb_dir):
    """No leakage: validation is carved from IMDB's train split only, test is IMDB's test split (never
    train reviews), and every text keeps its own label."""
    imdb = load_imdb(imdb_dir)
    label_of = {t: y for part in imdb.values() for t, y in zip(part.texts, part.labels)}
    assert len(label_of) == len(imdb["train"]) + len(imdb["test"])  # no review in both splits
    s = load_splits(DataConfig(path=str(imdb_dir), val_size=0.25), seed=1)
    assert sorted(s.train.texts + s.val.texts) == sorted(imdb["train"].texts)  # a partition of train
    assert s.test.texts == imdb["test"].texts and s.test.labels == imdb["test"].labels
    for part in (s.train, s.val, s.test):
        assert part.labels == [label_of[t] for t in part.texts]
    assert s.val.labels.count(0) == s.val.labels.count(1) == 6  # stratified: a quarter of each class
    sub = load_splits(DataConfig(path=str(imdb_dir), val_size=0.25, max_eval_samples=10), seed=1)
    assert set(sub.test.texts) < set(imdb["test"].texts) and set(sub.val.texts) < set(s.val.texts)


def test_labeled_train_file_without_test_carves_both(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(40)))
    s = load_splits(DataConfig(train_file=str(p), val_size=0.1), seed=0)
    assert len(s.train) + len(s.val) + len(s.test) == 40
    assert not set(s.test.texts) & (set(s.train.texts) | set(s.val.texts))


@pytest.mark.parametrize("labels", [[1] * 40, [1] * 39 + [0]])
def test_a_training_split_of_one_class_is_refused_naming_the_flag(tmp_path, labels):
    # all positive; or one negative, which the validation slice takes (it holds one review of each class)
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"review {i},{y}\n" for i, y in enumerate(labels)))
    with pytest.raises(UserError) as e:
        load_splits(DataConfig(train_file=str(p), val_size=0.1), seed=0)
    assert str(e.value).startswith(
        f"--train-file {p}: every training review ("
    ) and "is positive (label 1)" in str(e.value)


def test_a_test_file_of_one_class_is_accepted(tmp_path):
    # accuracy on one class's reviews is a fair question; only the training split needs both
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(20)))
    test.write_text("text,label\n" + "".join(f"other {i},0\n" for i in range(5)))
    s = load_splits(DataConfig(train_file=str(train), test_file=str(test), val_size=0.1), seed=0)
    assert set(s.train.labels) == {0, 1} and s.test.labels == [0] * 5


@pytest.fixture(scope="module", params=["roberta", "bert"])
def tok(request, tiny_models):
    """roberta-base's real BPE tokenizer (from ../shared) and the tiny WordPiece one (always there), so
    truncation and windows are checked on a machine without ../shared too."""
    from transformers import AutoTokenizer

    if request.param == "roberta":
        needs_shared()
        return AutoTokenizer.from_pretrained(ROBERTA_BASE)
    return AutoTokenizer.from_pretrained(tiny_models("bert"))


def long_text(n_words: int) -> str:
    """Words both tokenizers know, in an order that never repeats a slice (a shifted slice differs)."""
    rng = random.Random(n_words)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def test_head_truncation_equals_the_tokenizers_own(tok):
    texts = ["short one", "word " * 300, "Great movie! " * 40]
    ours = encode(tok, texts, max_length=64)
    theirs = tok(texts, truncation=True, max_length=64)["input_ids"]
    assert ours == theirs


def test_head_tail_keeps_exactly_the_first_and_last_tokens(tok):
    text = long_text(400)
    body = tok(text, add_special_tokens=False)["input_ids"]
    (ids,) = encode(tok, [text], max_length=64, truncation="head_tail", head_tokens=20)
    assert len(ids) == 64
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids[1:21] == body[:20]
    assert ids[21:-1] == body[-42:]
    short = encode(tok, ["tiny review"], 64, "head_tail", 20)
    assert short == tok(["tiny review"])["input_ids"]


def test_a_huge_text_reaches_the_tokenizer_as_its_start_and_end_only(tok):
    from imdb_lora.data.tokenize import MAX_TEXT_CHARS

    class Spy:  # the tokenizer, recording the length of every text it is given
        def __init__(self):
            self.longest = 0

        def __call__(self, texts, **kw):
            self.longest = max(
                [self.longest] + [len(t) for t in ([texts] if isinstance(texts, str) else texts)]
            )
            return tok(texts, **kw)

    text = long_text(MAX_TEXT_CHARS // 3)  # about 2.5 times the bound
    assert len(text) > 2 * MAX_TEXT_CHARS
    body = tok(text, add_special_tokens=False)["input_ids"]
    spy = Spy()
    (head,) = encode(spy, [text], max_length=64)
    (head_tail,) = encode(spy, [text], max_length=64, truncation="head_tail", head_tokens=20)
    assert spy.longest <= MAX_TEXT_CHARS + 1  # a 47 MB line went whole into the tokenizer (6.9 GB)
    assert head[1:-1] == body[:62]  # the same ids as from the whole text
    assert head_tail[1:21] == body[:20] and head_tail[21:-1] == body[-42:]  # the end is read too


def test_windows_cover_every_token_and_end_at_the_end(tok):
    from imdb_lora.data.tokenize import encode_windows

    long = long_text(300)
    body = tok(long, add_special_tokens=False)["input_ids"]
    windows, owner = encode_windows(tok, ["short review", long], max_length=64, stride=40)
    assert owner[0] == 0 and owner.count(0) == 1 and owner[1:] == [1] * (len(owner) - 1)
    assert windows[0] == tok("short review")["input_ids"]
    bodies = [w[1:-1] for w in windows[1:]]
    assert all(len(w) == 64 for w in windows[1:])
    assert bodies[0] == body[:62] and bodies[-1] == body[-62:]
    covered = set()
    for k, _b in enumerate(bodies[:-1]):
        covered |= set(range(40 * k, 40 * k + 62))
    covered |= set(range(len(body) - 62, len(body)))
    assert covered == set(range(len(body)))
    with pytest.raises(UserError, match="--window-stride"):
        encode_windows(tok, [long], 64, 0)


def test_token_budget_batches_cap_padding_and_keep_every_index():
    from imdb_lora.data.batches import token_budget_batches

    lengths = [512, 30, 500, 100, 90, 480, 20, 110]
    batches = token_budget_batches(lengths, batch_size=3, max_tokens=1024)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 1024 or len(b) == 1
    assert [0, 2] in batches  # the two longest together, the third long one alone after them


def test_csv_cells_longer_than_csvs_default_limit_are_read(tmp_path):
    long = "a wonderful film " * 12_000  # ~200 KB in one cell, past csv's 128 KB default
    f = tmp_path / "long.csv"
    f.write_text(f'text,label\n"{long}",1\nshort,0\n')
    assert load_labeled_file(f).texts == [long, "short"]
    assert read_texts(str(f), None) == ([long, "short"], 0)


@pytest.mark.parametrize("test_file", [False, True])
def test_a_train_file_too_small_to_leave_a_training_review_is_refused(tmp_path, test_file):
    """3 rows: validation takes one of each class, the carved test slice the last: a run trained on
    nothing finished, with a run directory like any other."""
    p = tmp_path / "three.csv"
    p.write_text("text,label\na,0\nb,1\nc,0\n" if not test_file else "text,label\na,0\nb,1\n")
    cfg = DataConfig(train_file=str(p), test_file=str(p) if test_file else None)
    with pytest.raises(
        UserError, match=r"--train-file .*three\.csv: [23] training reviews, all taken by the "
    ):
        load_splits(cfg, seed=0)


@pytest.mark.parametrize("by_env", [False, True])
def test_a_data_refusal_names_where_the_path_came_from(tmp_path, monkeypatch, by_env):
    """An IMDB copy too small to train on, chosen by $IMDB_LORA_DATA: the refusal named --data, a flag
    the user never typed."""
    root = write_imdb(tmp_path / "imdb", per_class=1)
    monkeypatch.setenv("IMDB_LORA_DATA", str(root))
    with pytest.raises(UserError) as e:
        load_splits(DataConfig(path=None if by_env else str(root)), seed=0)
    origin = "$IMDB_LORA_DATA" if by_env else "--data"
    assert str(e.value).startswith(f"{origin} {root}: 2 training reviews, all taken by the validation split")
