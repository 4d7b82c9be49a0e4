"""The model card (README.md of a run): metadata and loading snippet fit the method, a local base model is
named without its machine path, and calibration is reported as ECE, Brier and NLL before and after."""

from imdb_lora.config import Config
from imdb_lora.runs.report import model_card

FIGURES = {"ece": 0.0512, "brier": 0.0934, "nll": 0.3121, "accuracy": 0.875}
CALIBRATED = {"ece": 0.0123, "brier": 0.0901, "nll": 0.2817, "accuracy": 0.875}
SUMMARY = {
    "model_type": "bert",
    "trainable_parameters": 1_000,
    "total_parameters": 100_000,
    "trainable_percent": 1.0,
    "examples": {"train": 900, "val": 100, "test": 500},
    "best_epoch": 2,
    "val_accuracy": 0.88,
    "test_accuracy": 0.875,
    "calibration": {
        "enabled": True,
        "temperature": 1.7,
        "val": {"before": FIGURES, "after": CALIBRATED},
        "test": {"before": FIGURES, "after": CALIBRATED},
    },
}


def card(model: str, method: str, random_init: bool = False) -> str:
    cfg = Config.from_dict(
        {"model": {"name": model, "random_init": random_init}, "train": {"method": method}}
    )
    return model_card(cfg.validate(), [], SUMMARY)


def metadata(text: str) -> str:
    return text.split("---")[1]


def test_lora_card_on_a_hub_model_names_it_and_loads_the_adapter_with_peft():
    text = card("FacebookAI/roberta-base", "lora")
    assert "library_name: peft" in metadata(text)
    assert "base_model: FacebookAI/roberta-base" in metadata(text)
    assert 'from_pretrained("FacebookAI/roberta-base", num_labels=2), "adapter")' in text


def test_full_card_loads_model_folder_with_transformers_and_hides_the_local_path(tmp_path):
    text = card(str(tmp_path / "models" / "all-MiniLM-L6-v2"), "full")
    assert "library_name: transformers" in metadata(text)
    assert "base_model" not in metadata(text)  # a local folder is no hub id
    assert str(tmp_path) not in text
    assert "local folder `all-MiniLM-L6-v2`" in text
    assert 'AutoModelForSequenceClassification.from_pretrained("model")' in text
    assert "adapter" not in text.lower()


def test_lora_card_on_a_local_model_points_the_snippet_at_a_placeholder_folder(tmp_path):
    text = card(str(tmp_path / "models" / "all-MiniLM-L6-v2"), "lora")
    assert str(tmp_path) not in text
    assert 'from_pretrained("path/to/all-MiniLM-L6-v2", num_labels=2), "adapter")' in text
    assert "the adapter holds the trained one" in text  # transformers' warning is expected


def test_card_reports_ece_brier_and_nll_before_and_after_on_both_splits():
    text = card("FacebookAI/roberta-base", "lora")
    assert "temperature 1.7000" in text
    for split in ("validation", "test"):
        assert f"| {split} | raw | 5.12% | 0.0934 | 0.3121 | 87.50% |" in text
        assert f"| {split} | calibrated | 1.23% | 0.0901 | 0.2817 | 87.50% |" in text


def test_random_init_card_names_the_architecture_without_its_path(tmp_path):
    text = card(str(tmp_path / "models" / "roberta-base"), "lora", random_init=True)
    assert str(tmp_path) not in text
    assert "`roberta-base` architecture, random weights (saved in `base_model/`)" in text
    assert 'from_pretrained("base_model", num_labels=2)' in text


SUBSET = {
    **SUMMARY,
    "examples_available": {"train": 23_750, "val": 1_250, "test": 25_000},
    "data_source": {"kind": "imdb", "path": "/somewhere/aclImdb_v1.tar.gz"},
    "device": "cpu",
    "precision": "fp32",
    "machine": {"cpu": "AMD EPYC", "cpus": 2, "torch_threads": 2, "os": "Linux"},
    "train_seconds": 312.0,
    "finished_at": "2026-11-30T03:10:00Z",
}


def subset_card(summary: dict, **data) -> str:
    cfg = Config.from_dict({"model": {"name": "FacebookAI/roberta-base"}, "data": data})
    return model_card(cfg.validate(), [], summary)


def test_subset_run_says_it_is_a_subset_of_imdb_and_how_to_evaluate_the_same_reviews():
    text = subset_card(SUBSET)
    assert "IMDB movie reviews (Large Movie Review Dataset v1.0" in text and "**a subset**" in text
    assert "900 of 23,750 training reviews (IMDB train, less validation; stratified" in text
    assert "100 of 1,250 validation reviews (5% held out of IMDB train; stratified" in text
    assert "500 of 25,000 test reviews (IMDB test; stratified" in text
    assert "/somewhere" not in text
    # evaluate reads the whole test split unless told: the card gives the subset its figure comes from
    assert "imdb-lora evaluate THIS_DIR --data aclImdb_v1.tar.gz --max-samples 500" in text
    assert "87.50% on 500 test reviews (95% interval ±2.9 points)" in text
    assert "Trained on a subset (900 of 23,750 training reviews)" in text


def test_full_data_run_is_not_called_a_subset():
    full = {**SUBSET, "examples": {"train": 23_750, "val": 1_250, "test": 25_000}}
    text = subset_card(full)
    assert "subset" not in text and "--max-samples" not in text
    assert "23,750 training reviews (IMDB train, less validation)" in text


def test_card_metadata_parses_on_the_hub_and_claims_only_what_is_true(tmp_path):
    """huggingface_hub.ModelCard reads the front matter. It lacked pipeline_tag, datasets, language and
    metrics; model-index (the hub's results table) is there only for pretrained weights read on the
    whole IMDB test split: not for a subset, a random-init run or a run on labeled files."""
    from huggingface_hub import ModelCard

    full = {**SUBSET, "examples": {"train": 23_750, "val": 1_250, "test": 25_000}}
    data = ModelCard(subset_card(full)).data
    assert (data.library_name, data.base_model) == ("peft", "FacebookAI/roberta-base")
    assert data.pipeline_tag == "text-classification" and data.metrics == ["accuracy"]
    assert data.datasets == ["stanfordnlp/imdb"] and data.language == ["en"]
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_split) == (
        "text-classification",
        "stanfordnlp/imdb",
        "test",
    )
    assert (result.metric_type, result.metric_value) == ("accuracy", 0.875)
    assert data.model_name == "roberta-base-lora-imdb"

    subset = ModelCard(subset_card(SUBSET)).data  # 500 of 25,000 test reviews
    assert subset.eval_results is None and subset.datasets == ["stanfordnlp/imdb"]
    small = {**full, "examples": {**full["examples"], "test": 48}, "examples_available": {"test": 48}}
    assert (
        ModelCard(subset_card(small)).data.eval_results is None
    )  # all of a 48-review folder: not IMDB's test
    cfg = Config.from_dict({"model": {"name": "FacebookAI/roberta-base", "random_init": True}}).validate()
    assert ModelCard(model_card(cfg, [], full)).data.eval_results is None
    files = {**full, "data_source": {"kind": "files"}, "examples_available": {}}
    data = ModelCard(subset_card(files, train_file=str(tmp_path / "tickets.csv"))).data
    assert data.eval_results is None and data.datasets is None and data.language is None
    assert data.pipeline_tag == "text-classification"


def test_card_names_the_device_the_training_time_and_the_date():
    text = subset_card(SUBSET)
    assert (
        "- Trained on: CPU (AMD EPYC, 2 threads), fp32; 5.2 min of training, finished 2026-11-30T03:10:00Z"
        in text
    )


def test_card_of_a_run_on_labeled_files_does_not_claim_imdb(tmp_path):
    files = {**SUBSET, "data_source": {"kind": "files"}, "examples_available": {}}
    text = subset_card(files, train_file=str(tmp_path / "tickets.csv"))
    assert "IMDB" not in text and "imdb" not in text.split("---")[1]
    assert "labeled file `tickets.csv`" in text and str(tmp_path) not in text
    assert "a second 5% held out of `tickets.csv`" in text
    assert "aclImdb" not in text  # its card told it to evaluate on IMDB
    assert "imdb-lora evaluate THIS_DIR   # the files config.yaml names" in text
    with_test = subset_card(
        files, train_file=str(tmp_path / "tickets.csv"), test_file=str(tmp_path / "t.jsonl")
    )
    assert "imdb-lora evaluate THIS_DIR --file t.jsonl\n" in with_test and "aclImdb" not in with_test


def test_card_of_a_run_on_part_of_its_test_file_evaluates_the_same_part(tmp_path):
    """`--file t.jsonl` reads the whole file (and takes no --max-samples): the card's figure came from 500
    of its 2,000 reviews, which `evaluate THIS_DIR --max-samples 500` reads again from config.yaml."""
    part = {**SUBSET, "data_source": {"kind": "files"}, "examples_available": {"test": 2_000}}
    text = subset_card(part, train_file=str(tmp_path / "tickets.csv"), test_file=str(tmp_path / "t.jsonl"))
    assert "imdb-lora evaluate THIS_DIR --max-samples 500   # the files config.yaml names" in text
    assert "--file" not in text and "aclImdb" not in text


def test_card_says_how_long_a_text_it_reads():
    text = subset_card(SUBSET, max_length=128, truncation="head_tail", head_tokens=64)
    assert "first 64 and last 64 tokens" in text


def test_results_md_names_a_local_base_model_without_its_path(tmp_path):
    from imdb_lora.runs.report import results_markdown

    local = str(tmp_path / "models" / "all-MiniLM-L6-v2")
    summary = {
        **SUBSET,
        "model": local,
        "method": "lora",
        "random_init": False,
        "train_path": "padded",
        "eval_path": "padded",
        "weights_bytes": 1_000,
        "peak_memory_bytes": 1_000,
        "peak_memory_kind": "CPU (process peak RSS)",
    }
    cfg = Config.from_dict({"model": {"name": local}}).validate()
    history = [
        {"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.88,
         "train_seconds": 312.0}
    ]  # fmt: skip
    text = results_markdown(cfg, history, summary)
    assert str(tmp_path) not in text
    assert "# Results: all-MiniLM-L6-v2 (lora)" in text and "| Model | all-MiniLM-L6-v2 |" in text


def test_reliability_legend_gives_the_ece_results_md_reports():
    from imdb_lora.runs.report import calibration_rows, reliability_label

    table = [
        {"lo": 0.5, "hi": 0.6, "count": 3, "confidence": 0.55, "accuracy": 1 / 3},
        {"lo": 0.9, "hi": 1.0, "count": 1, "confidence": 0.95, "accuracy": 1.0},
    ]
    ece = (3 * abs(1 / 3 - 0.55) + 1 * 0.05) / 4  # 17.50%
    assert reliability_label("before", table) == "raw (ECE 17.50%)"
    assert reliability_label("after", table) == "calibrated (ECE 17.50%)"
    figures = {"ece": ece, "brier": 0.1, "nll": 0.2, "accuracy": 0.5}
    assert "| 17.50% |" in calibration_rows({"val": {"before": figures}})[2]
