"""run.json's model_revision: the commit a hub model was loaded from, read from the hub cache."""

import shutil

from imdb_lora.modeling.load import hub_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_model_revision_is_the_cached_snapshot(tiny_models, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    # the hub cache's own layout: refs/main names the commit whose snapshot holds the files
    repo = tmp_path / "hub" / "models--someorg--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tiny_models("bert"), repo / "snapshots" / COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_revision("someorg/tiny-bert") == COMMIT
    assert hub_revision("someorg/not-cached") is None
    assert hub_revision(str(tiny_models("bert"))) is None  # a local folder has no hub revision
