"""Fixtures: tiny random models (roberta/bert/mpnet) and a tiny learnable aclImdb, all written by the tests.

The real roberta-base tokenizer and config come from ../shared (or $IMDB_LORA_SHARED).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # pytest-xdist's controller runs no test: importing torch here (~4 s) delays the workers
    import torch

    torch.set_num_threads(1)  # tiny models: threads only add contention on a 2-core machine


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A pytest-xdist worker has sent every report by now; what is left is the interpreter's teardown of
    torch, transformers, peft and the session's objects (2-5 s, while the controller waits). Skipped,
    unless coverage is measuring (it writes its data at exit)."""
    if "PYTEST_XDIST_WORKER" in os.environ and "coverage" not in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@pytest.fixture(autouse=True, scope="session")
def private_token_cache(tmp_path_factory):
    """The token cache of every test lives in a temporary folder, never in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMDB_LORA_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def quick_plots(request):
    """A training run draws curves.png and reliability.png with matplotlib: ~1.3 s of its ~2.3 s on a tiny
    model, paid by every test that trains (and the plots are not what those tests check). Here the run's
    plotting code still builds every figure, axis, line and label from its history; only the layout and
    the rasterising are skipped, and the file says so (not a PNG, so a test reading it as an image fails).
    The plots themselves are drawn for real by tests marked `real_plots` (tests/runs/test_report.py), by
    the session's trained_run (built before this fixture applies), in subprocesses and in the slow suite."""
    if request.node.get_closest_marker("real_plots") or request.node.get_closest_marker("slow"):
        yield
        return
    from matplotlib.figure import Figure

    def unrendered(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"not rendered: tests/conftest.py quick_plots\n")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", unrendered)
        mp.setattr(Figure, "tight_layout", lambda self, *args, **kwargs: None)
        yield


REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMDB_LORA_SHARED", REPO.parent / "shared"))
ROBERTA_BASE = SHARED / "models" / "roberta-base"

POS_WORDS = ["great", "wonderful", "superb", "loved", "brilliant", "moving", "excellent", "beautiful"]
NEG_WORDS = ["awful", "boring", "terrible", "hated", "dull", "waste", "poor", "horrible"]
FILLER = ["the", "movie", "film", "plot", "acting", "was", "and", "a", "story", "really", "it", "this", "i"]
SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIALS_MPNET = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def needs_shared():
    if not ROBERTA_BASE.is_dir():
        pytest.skip(f"shared roberta-base tokenizer not found at {ROBERTA_BASE} (set IMDB_LORA_SHARED)")


def review(rng: random.Random, label: int, n_words: int) -> str:
    words = POS_WORDS if label else NEG_WORDS
    body = [rng.choice(FILLER) if rng.random() < 0.6 else rng.choice(words) for _ in range(n_words)]
    return " ".join(body) + "."


def write_imdb(root: Path, per_class: int = 24, seed: int = 0) -> Path:
    """aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt with reviews a tiny model can learn."""
    rng = random.Random(seed)
    for split in ("train", "test"):
        for label, name in ((1, "pos"), (0, "neg")):
            d = root / "aclImdb" / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (d / f"{i}_{8 if label else 2}.txt").write_text(review(rng, label, rng.randint(5, 40)))
    (root / "aclImdb" / "README").write_text("tiny test copy\n")
    return root / "aclImdb"


def tiny_byte_level_bpe(words: list[str]):
    """roberta-base's kind of tokenizer (byte-level BPE, <s> <pad> </s> <unk> <mask> as ids 0-4) with a
    vocabulary learned from the test reviews' words: any text encodes (unknown words byte by byte), and
    no tokenizer files from ../shared are needed."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" ".join(words)] * 4,
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    model = json.loads(bpe.to_str())["model"]
    return RobertaTokenizerFast(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def build_tiny(kind: str, dest: Path, layers: int = TINY["num_hidden_layers"]) -> Path:
    """A tiny random model folder (config, safetensors weights, tokenizer) of the given architecture."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertTokenizerFast,
        MPNetConfig,
        MPNetTokenizerFast,
        RobertaConfig,
    )

    dest.mkdir(parents=True, exist_ok=True)
    words = sorted(set(POS_WORDS + NEG_WORDS + FILLER + list("abcdefghijklmnopqrstuvwxyz.,!?'")))
    sizes = dict(TINY, num_hidden_layers=layers)
    if kind == "roberta":
        tok = tiny_byte_level_bpe(words)
        cfg = RobertaConfig(vocab_size=len(tok), max_position_embeddings=130, pad_token_id=1, **sizes)
    elif kind == "bert":
        vocab = {w: i for i, w in enumerate(SPECIALS_BERT + words)}
        tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
        cfg = BertConfig(vocab_size=len(SPECIALS_BERT) + len(words), max_position_embeddings=128, **sizes)
    elif kind == "mpnet":
        vocab = {w: i for i, w in enumerate(SPECIALS_MPNET + words)}
        tok = MPNetTokenizerFast(vocab=vocab, do_lower_case=True)
        cfg = MPNetConfig(
            vocab_size=len(SPECIALS_MPNET) + len(words), max_position_embeddings=130, pad_token_id=1, **sizes
        )
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    cfg.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(cfg)
    # transformers prints a "Writing model shards" bar: kept out of the stderr a test may be capturing
    # (a fixture built lazily inside a test would otherwise show up in what that test reads back)
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(dest)
        tok.save_pretrained(dest)
    return dest


def shared_folder(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """A folder built once per test session and read by every pytest-xdist worker: under the workers'
    common temporary root, built by the first worker to ask, behind a file lock (pytest-xdist's
    documented pattern for session fixtures). Without xdist, a folder of the session's own. What it
    holds is shared: a test that changes it must work on a copy (trained_run checks this)."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    dest = root / "shared" / name
    done = dest.parent / f"{dest.name}.done"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # closing the file releases it
        if not done.exists():
            if dest.exists():  # a worker failed half-way through building it
                shutil.rmtree(dest)
            build(dest)
            done.touch()
    return dest


@pytest.fixture(scope="session")
def imdb_dir(tmp_path_factory) -> Path:
    return shared_folder(tmp_path_factory, "data", write_imdb) / "aclImdb"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kind -> folder, built once per session (shared by the xdist workers)."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = shared_folder(tmp_path_factory, f"models/{kind}", lambda d: build_tiny(kind, d))
        return cache[kind]

    return get


TRAIN_STARTUP = ("reading ", "tokenize ", "data ready in ", "loading model ")


def without_startup(err: str) -> str:
    """stderr less train's startup progress (what it reads, tokenization bars, model loading), which
    comes before an error found late in setup but is not part of the error's one line."""
    lines = re.split(r"[\r\n]", err)
    return "".join(f"{line}\n" for line in lines if line.strip() and not line.startswith(TRAIN_STARTUP))


def sigint_as_in_a_terminal() -> None:
    """preexec_fn of a child that a test sends SIGINT (Ctrl-C): as a terminal's foreground job has it.
    A job a non-interactive shell starts in the background (`cmd &`, as CI runners and nohup scripts do)
    ignores SIGINT, its children inherit that, and imdb-lora then rightly keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_running_until(proc, ready: Callable[[], bool], seconds: float = 300, poll: float = 0.01) -> None:
    """Wait while `proc` runs until `ready()` holds (at most `seconds`: a few starts of Python with torch on
    a loaded machine); the caller asserts what it needs of both afterwards."""
    deadline = time.time() + seconds
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(poll)


def hold_train_at(method: str, ready: Path, env: dict[str, str], rank: int | None = None) -> dict[str, str]:
    """`env` for a real `imdb-lora` command whose `train` processes (under torchrun: `rank` alone, if
    given) wait in `Trainer.<method>` (its n-th call with "method:n") until a signal comes, having
    created `ready` (tests/held/sitecustomize.py): a test sends its signal once `ready` exists, at that
    point whatever the machine's load."""
    path = os.pathsep.join(p for p in (str(Path(__file__).parent / "held"), env.get("PYTHONPATH")) if p)
    held = {"IMDB_LORA_TEST_HOLD_AT": method, "IMDB_LORA_TEST_HOLD_READY": str(ready)}
    if rank is not None:
        held["IMDB_LORA_TEST_HOLD_RANK"] = str(rank)
    return {**env, "PYTHONPATH": path, **held}


def hold_score_at(method: str, ready: Path, env: dict[str, str]) -> dict[str, str]:
    """As hold_train_at, for a real `imdb-lora score` process: it waits in the local engine's
    `PartWriter.<method>` (its n-th call with "method:n"), having created `ready`."""
    return {**hold_train_at(method, ready, env), "IMDB_LORA_TEST_HOLD_COMMAND": "score"}


@contextlib.contextmanager
def sigterm_fails_the_test():
    """Tests that send this process SIGTERM: if the code under test does not take it, the test fails
    (with its default, SIGTERM would end pytest itself). Yields the handler the code must put back."""

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the test: the command under test did not take it")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        yield unhandled
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A quick, deterministic CPU training command line for tiny models."""
    return [
        "train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
        "--epochs", "2", "--batch-size", "8", "--max-length", "64", "--lr", "3e-3",
        "--val-size", "0.25", "--device", "cpu", *extra,
    ]  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """relative path -> (mtime, size, mode) of a folder and everything in it."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size, p.stat().st_mode)
        for p in [folder, *folder.rglob("*")]
    }


@pytest.fixture(scope="session")
def trained_run(tiny_models, imdb_dir, tmp_path_factory) -> Iterator[Path]:
    """A finished LoRA run on the tiny bert model, trained once per session and shared by read-only
    tests (in every xdist worker at the same time): a test that writes into it, or takes its lock, must
    use a copy. At the end of the session the run must be as it was built, or its last test errors."""
    from imdb_lora.cli import main

    def train(runs: Path) -> None:
        assert main(train_args(tiny_models("bert"), imdb_dir, runs / "bert-lora")) == 0

    out = shared_folder(tmp_path_factory, "runs", train) / "bert-lora"
    built = snapshot(out)
    yield out
    after = snapshot(out)
    changed = {k for k in built.keys() | after.keys() if built.get(k) != after.get(k)}
    assert not changed, f"a test changed the shared trained_run (use a copy): {sorted(changed)}"
