import sys
from pathlib import Path

# The project is flat scripts at the repo root; make them importable from tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A small Llama-style tokenizer trained with sentencepiece (the H5 writer and reader tests)."""
    from preprocess_dataset import write_llama_tokenizer
    from test_create_hdf5_dataset import TRAIN_TEXTS

    out = tmp_path_factory.getbasetemp() / "hdf5_trained_tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        write_llama_tokenizer(TRAIN_TEXTS, out, vocab_size=400)
    return out


@pytest.fixture(scope="session", autouse=True)
def tokenizer_cache(tmp_path_factory):
    """The stage-2 writer's tokenizer cache in a temporary folder, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("tokenizer_cache")
        mp.setenv("LLAVA_TOKENIZER_CACHE", str(path))
        yield path
