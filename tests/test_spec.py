"""Model specs: aliases, hub files, quants and paths; hostile specs never get through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmctl.errors import ModelError
from vmctl.models.spec import (
    REPO_RE,
    CatalogSpec,
    HubSpec,
    PathSpec,
    check_repo_file,
    parse_spec,
    pick_mmproj,
    safe_join,
    select_quant,
    split_parts,
)


def test_kinds() -> None:
    assert parse_spec("qwen3.5-27b") == CatalogSpec("qwen3.5-27b")
    assert parse_spec("org/repo:Model-Q4_K_M.gguf") == HubSpec("org/repo", file="Model-Q4_K_M.gguf")
    assert parse_spec("org/repo:UD-Q6_K_XL") == HubSpec("org/repo", quant="UD-Q6_K_XL")
    assert parse_spec("org/repo") == HubSpec("org/repo")
    assert parse_spec("org/repo:Q8/m-00001-of-00002.gguf").file == "Q8/m-00001-of-00002.gguf"


def test_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "sub" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(b"x")
    assert parse_spec(str(model)) == PathSpec(model)
    monkeypatch.chdir(tmp_path)
    assert parse_spec("./sub/m.gguf") == PathSpec(model)
    assert parse_spec("sub/m.gguf") == PathSpec(model)  # contains / and exists
    with pytest.raises(ModelError, match="no such model file"):
        parse_spec("./missing.gguf")


@pytest.mark.parametrize(
    "spec",
    [
        "../../org/repo:f.gguf",
        "org/repo:../../evil.gguf",
        "org/repo:/etc/passwd.gguf",
        "org/repo:a//b.gguf",
        "org/repo:./x.gguf",
        "../repo:f.gguf",
        "org/..:f.gguf",
        "org/repo/extra:f.gguf",
        "org/repo:Q4 K",
        "org/re po",
        "",
        "a\0b",
    ],
)
def test_hostile_specs_refused(spec: str) -> None:
    with pytest.raises(ModelError):
        parse_spec(spec)


def test_unknown_alias_is_one_line_with_suggestions() -> None:
    with pytest.raises(ModelError) as e:
        parse_spec("qwen3.5-72b")
    assert "\n" not in e.value.message
    assert "qwen3.5-27b" in e.value.message
    assert e.value.hint is not None and "vmctl models" in e.value.hint


LISTING = [
    "README.md",
    "Model-BF16.gguf",
    "Model-F16.gguf",
    "Model-Q6_K_XL.gguf",
    "Model-Q6_K.gguf",
    "Model-UD-Q4_K_XL.gguf",
    "mmproj-F16.gguf",
    "mmproj-F32.gguf",
    "Q8_0/Model-Q8_0-00001-of-00002.gguf",
    "Q8_0/Model-Q8_0-00002-of-00002.gguf",
]


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("F16", ("Model-F16.gguf",)),
        ("bf16", ("Model-BF16.gguf",)),
        ("Q6_K", ("Model-Q6_K.gguf",)),
        ("Q6_K_XL", ("Model-Q6_K_XL.gguf",)),
        ("Q4_K_XL", ("Model-UD-Q4_K_XL.gguf",)),
        ("Q8_0", ("Q8_0/Model-Q8_0-00001-of-00002.gguf", "Q8_0/Model-Q8_0-00002-of-00002.gguf")),
    ],
)
def test_quant_selection(label: str, expected: tuple[str, ...]) -> None:
    assert select_quant(LISTING, label) == expected


def test_quant_prefers_exact_then_falls_back() -> None:
    assert select_quant(["M-Q6_K_XL.gguf"], "Q6_K") == ("M-Q6_K_XL.gguf",)
    with pytest.raises(ModelError, match="no GGUF file for quant 'Q3_K_M'"):
        select_quant(LISTING, "Q3_K_M")
    with pytest.raises(ModelError, match="no GGUF file"):
        select_quant(["mmproj-F16.gguf"], "F16")  # a projector is never the model


def test_default_quant_and_only_file() -> None:
    assert select_quant(["a-Q8_0.gguf", "a-Q4_K_M.gguf"], None) == ("a-Q4_K_M.gguf",)
    assert select_quant(["only.gguf", "mmproj-f16.gguf"], None) == ("only.gguf",)
    with pytest.raises(ModelError, match="several GGUF files"):
        select_quant(["a-Q8_0.gguf", "a-Q5_0.gguf"], None)


def test_split_needs_every_part() -> None:
    assert split_parts("m-00002-of-00003.gguf")[0] == "m-00001-of-00003.gguf"
    with pytest.raises(ModelError, match="missing 1 of 2 parts"):
        select_quant(["x-Q8_0-00001-of-00002.gguf"], "Q8_0")


def test_mmproj_preference() -> None:
    sizes: dict[str, int | None] = {"mmproj-F32.gguf": 10, "mmproj-BF16.gguf": 6, "m.gguf": 1}
    assert pick_mmproj(sizes) == "mmproj-BF16.gguf"
    assert pick_mmproj({**sizes, "mmproj-F16.gguf": 7}) == "mmproj-F16.gguf"
    assert pick_mmproj({"mmproj-a.gguf": 9, "mmproj-b.gguf": 3}) == "mmproj-b.gguf"
    assert pick_mmproj({"m.gguf": 1}) is None


def _assert_safe(spec: object, root: Path) -> None:
    if isinstance(spec, HubSpec):
        assert REPO_RE.match(spec.repo)
        assert all(p not in {".", ".."} for p in spec.repo.split("/"))
        if spec.file is not None:
            check_repo_file(spec.file)
            target = Path(os.path.normpath(root / spec.file))
            assert target.is_relative_to(root)
            assert safe_join(root, spec.file) == target
    else:
        assert isinstance(spec, CatalogSpec | PathSpec)


SPEC_CHARS = st.sampled_from([*"ab/.:-_~Q4K \\\0", "..", "../", "/.."])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(SPEC_CHARS, max_size=20).map("".join)))
def test_any_string_parses_safely_or_raises_model_error(text: str) -> None:
    root = Path("/cache/models--o--r/snapshots/c")
    try:
        spec = parse_spec(text)
    except ModelError:
        return
    _assert_safe(spec, root)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "..", ".", "", "b.gguf", "/"]), min_size=1, max_size=6))
def test_file_parts_never_escape(parts: list[str]) -> None:
    name = "/".join(parts)
    try:
        check_repo_file(name)
    except ModelError:
        return
    assert ".." not in name.split("/") and not name.startswith("/")
